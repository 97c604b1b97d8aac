"""How a command ends: every failure as one line on stderr and an exit status, never a traceback
unless asked for (``--debug`` or ``SMOE_DEBUG=1``).

- a :class:`~smoe_gguf.errors.SmoeError`: its message, its exit status (1, or 2 for usage);
- Ctrl-C: ``interrupted``, 130;
- SIGTERM / SIGHUP: ``terminated by SIGTERM``, 128 + the signal (raised as :class:`Terminated`
  in the main thread, so files being written are removed on the way out, as for Ctrl-C);
- an OSError nobody expected: its file and reason, 1;
- anything else: ``internal error: ...``, 1.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from rich.markup import escape

from .console import err
from .errors import SmoeError

DEBUG = False  # set by the --debug option for this invocation


class Terminated(BaseException):
    """A termination signal, raised where the main thread is, so that cleanups run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, _frame: Any) -> None:
    raise Terminated(signum)


def debug() -> bool:
    return DEBUG or os.environ.get("SMOE_DEBUG", "") not in ("", "0")


_CONTROL = {c: "?" for c in [*range(0x00, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]}
MAX_MESSAGE = 2000


def one_line(text: str) -> str:
    """``text`` safe to print as one line: control characters and line separators become '?',
    and a message of hostile length is cut short."""
    text = text.translate(_CONTROL)
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "..."


def _fail(message: str, code: int, style: str = "error") -> None:
    if debug():
        traceback.print_exc()
    label = "[red]error:[/] " if style == "error" else ""
    err.print(label + escape(one_line(message)), highlight=False, soft_wrap=True, style="red" if not label else None)
    sys.exit(code)


def _interrupted(e: BaseException) -> bool:
    """Whether a KeyboardInterrupt is in the chain of ``e`` (typer turns Ctrl-C into exit 130)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, KeyboardInterrupt):
            return True
        stack += [x.__cause__, x.__context__]
    return False


def run_app(app: Callable[[], Any]) -> None:
    """Run the typer ``app`` and turn whatever it raises into one line and an exit status."""
    global DEBUG
    DEBUG = False
    main_thread = threading.current_thread() is threading.main_thread()
    old = {}
    if main_thread:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            old[sig] = signal.signal(sig, _on_signal)
    try:
        app()
    except SmoeError as e:
        _fail(str(e), e.exit_code)
    except SystemExit as e:
        if e.code == 130 and _interrupted(e):
            _fail("interrupted", 130, style="plain")
        raise
    except KeyboardInterrupt:
        _fail("interrupted", 130, style="plain")
    except Terminated as e:
        _fail(f"terminated by {signal.Signals(e.signum).name}", 128 + e.signum, style="plain")
    except OSError as e:
        name = f"{e.filename}: " if e.filename is not None else ""
        _fail(f"{name}{e.strerror or e}", 1)
    except RecursionError:
        _fail("internal error: input nested too deeply (run with --debug for details)", 1)
    except MemoryError:
        _fail("out of memory", 1)
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        _fail(f"internal error: {type(e).__name__}: {e} (run with --debug or SMOE_DEBUG=1 for the traceback)", 1)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
