"""One error type for bad user input. Entry scripts print it as a single line and exit non-zero."""

import sys


class UserError(Exception):
    """Bad input that the user can fix: the message names the value and the fix."""


def cli_result(action) -> int:
    """Run a command-line tool's `action` (returns the path it wrote): print the path and return 0, or print
    a UserError as one `error: ...` line on stderr and return 2 (the exit code the entry scripts use)."""
    try:
        path = action()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
