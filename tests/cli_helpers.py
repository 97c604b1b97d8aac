"""Run the `smoe-gguf` command line in-process, as a user would call it."""

from __future__ import annotations

import contextlib
import io
import sys

from smoe_gguf.cli import err, main, out


def run_cli(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `smoe-gguf ARGS...`."""
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["smoe-gguf", *args]
    out.file, err.file = stdout, stderr
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        out.file = err.file = None  # type: ignore[assignment]  # back to the live sys streams
    return code, stdout.getvalue(), stderr.getvalue()
