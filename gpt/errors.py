"""One error type for bad user input. Entry scripts print it as a single line and exit non-zero."""


class UserError(Exception):
    """Bad input that the user can fix: the message names the value and the fix."""
