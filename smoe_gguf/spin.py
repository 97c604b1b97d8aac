"""llama.cpp's OpenMP spin: how long its idle compute threads spin before they sleep.

libgomp reads ``GOMP_SPINCOUNT`` once, when llama.cpp loads it, so the choice is made before the
first ``import llama_cpp`` and holds for the process. Where leaves are paged, a gate that waits on
the disk or calls Python leaves the other compute threads idle; spinning, they would burn the
cores the readers and the observers need, so smoe-gguf shortens the spin (:data:`PAGING`). Where the
budget holds every leaf, nothing waits once the leaves are in, and libgomp's own spin
(:data:`LIBGOMP_DEFAULT`, what stock llama.cpp runs with) wakes the threads sooner for the next
piece of work. A spin the user set is never changed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PAGING = "2000"
LIBGOMP_DEFAULT = "300000"  # LIBGOMP's spin where OMP_WAIT_POLICY is unset
FROM_USER = "GOMP_SPINCOUNT" in os.environ
LOADED_FIRST = "llama_cpp" in sys.modules  # llama.cpp was loaded before this package: no spin was ours to set


def set_default() -> None:
    """The spin for paging, unless the user set one (at package import: anything that loads
    llama.cpp without choosing gets it)."""
    os.environ.setdefault("GOMP_SPINCOUNT", PAGING)


def for_budget(model: Path, budget: int | str | None) -> str | None:
    """Set the spin for running ``model`` with ``budget`` (as the engine resolves it): libgomp's
    own where the budget holds every leaf, else :data:`PAGING`. Returns the spin set, or None where
    it is not this call's to set: the user set it, llama.cpp is loaded already, or the model or
    budget is bad (the engine then reports it)."""
    if FROM_USER or "llama_cpp" in sys.modules:
        return None
    from . import budget as bdg
    from .errors import SmoeError
    from .source import leaf_footprint

    try:
        total, core = leaf_footprint(model)
        holds_all = bdg.resolve(budget, total, core) >= total
    except (SmoeError, OSError, ValueError):
        return None
    os.environ["GOMP_SPINCOUNT"] = LIBGOMP_DEFAULT if holds_all else PAGING
    return os.environ["GOMP_SPINCOUNT"]


def paging_warning(paging: bool) -> str | None:
    """A warning for a session that pages leaves while libgomp spins its own default: llama.cpp
    (and with it libgomp, which read ``GOMP_SPINCOUNT`` then) was loaded before this package, and
    the user set no spin. None otherwise, and where no libgomp is loaded (another OpenMP, or none)."""
    if not paging or FROM_USER or not LOADED_FIRST or not libgomp_loaded():
        return None
    return ("llama.cpp was loaded before smoe_gguf, so its OpenMP threads spin libgomp's default while "
            "leaves are paged, on the cores the reads need: import smoe_gguf first, or set GOMP_SPINCOUNT")


def libgomp_loaded() -> bool:
    """Whether libgomp is mapped into this process (Linux; elsewhere: False)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return any("libgomp" in line for line in f)
    except OSError:
        return False
