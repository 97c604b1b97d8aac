"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations


class SmoeError(Exception):
    """A user-facing failure: bad input, a corrupt pack, not enough disk.

    The message is one line that says what is wrong and, where possible, what to do.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
