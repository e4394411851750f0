"""One error type for bad user input. Entry scripts print it as a single line and exit non-zero."""

import sys


class UserError(Exception):
    """Bad input that the user can fix: the message names the value and the fix."""


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM. The message (one line; empty on ranks other than 0) says what
    was saved and how to resume; exit_code is 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
    A KeyboardInterrupt, so that no `except Exception` on the way out can swallow it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def exit_code(action) -> int:
    """Run a command-line tool's `action`: 0, or for a UserError one `error: ...` line on stderr and 2 (the exit
    code the entry scripts use)."""
    try:
        action()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cli_result(action) -> int:
    """exit_code of `action` (which returns the path it wrote), printing the path."""
    return exit_code(lambda: print(action()))
