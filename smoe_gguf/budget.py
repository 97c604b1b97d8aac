"""The X-Slot budget: how it is parsed, what a leaf costs against it, its minimum and default.

Every leaf is charged its worst-case page footprint (a slice that is not a page multiple can
touch one page more than its length suggests, and pages are what the system counts), so the
bytes the kernel reports resident in the X-Slot never exceed the budget. Percentages are of the
footprint of all leaves, so 100% holds every leaf.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Iterable

import psutil

from .errors import SmoeError

PAGE = mmap.PAGESIZE
MEMORY_MARGIN = 1 << 30  # left to the system and the core by the default budget

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def page_cost(nbytes: int) -> int:
    """Most bytes of pages a slice of ``nbytes`` can touch in page-aligned tensors of such slices."""
    if nbytes % PAGE == 0:
        return nbytes
    return (-(-nbytes // PAGE) + 1) * PAGE


def leaf_cost(part_bytes: Iterable[int]) -> int:
    """What one leaf of parts of these sizes is charged."""
    return sum(page_cost(n) for n in part_bytes)


def stage_costs(parts: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """What one leaf's gate/up parts (stage 0) and its down parts (stage 1) are charged on their
    own, from each part's (stage, bytes): a prompt micro-batch whose leaves do not fit whole is
    served one stage at a time."""
    cost = [0, 0]
    for stage, nbytes in parts:
        cost[stage] += page_cost(nbytes)
    return cost[0], cost[1]


def stage_leaf_cost(costs: Iterable[tuple[int, int]]) -> int | None:
    """What a leaf is charged at most where leaves are served one stage at a time (the larger
    stage of any, from :func:`stage_costs` of each); None where some leaf lacks parts of a stage
    (or there are none): such leaves are served whole only."""
    costs = list(costs)
    if not costs or not all(c0 and c1 for c0, c1 in costs):
        return None
    return max(max(c) for c in costs)


def min_budget(max_leaf_cost: int, n_expert_used: int) -> int:
    """The smallest budget that runs one token: one layer's selected leaves at once."""
    return max_leaf_cost * n_expert_used


def layer_budget(max_leaf_cost: int, n_expert: int) -> int:
    """The budget that holds every leaf of one layer (``max_leaf_cost``: a whole leaf's, or where
    leaves are served one stage at a time, the larger stage's): any micro-batch fits, and a prompt
    streams each leaf at most once per micro-batch."""
    return max_leaf_cost * n_expert


def micro_batch(budget: int, max_leaf_cost: int, n_expert: int, n_expert_used: int, n_ubatch: int) -> int:
    """The largest micro-batch (<= ``n_ubatch`` tokens) whose leaves (of ``max_leaf_cost`` each,
    as in :func:`layer_budget`) at one layer always fit ``budget``: all of ``n_ubatch`` if a whole
    layer fits, else budget / one token's leaves."""
    if budget >= layer_budget(max_leaf_cost, n_expert):
        return n_ubatch
    return max(1, min(n_ubatch, budget // min_budget(max_leaf_cost, n_expert_used)))


def parse_budget(text: str, total_cost: int) -> int:
    """``512MiB``, ``4G``, ``1500000`` (bytes) or ``25%`` (of all leaves' footprint) -> bytes."""
    t = text.strip()
    if t.endswith("%"):
        try:
            pct = float(t[:-1])
        except ValueError:
            raise SmoeError(f"bad budget {text!r}: use bytes (512MiB, 4G) or a percentage (25%)", 2) from None
        if not 0 < pct <= 100:
            raise SmoeError(f"bad budget {text!r}: a percentage must be in (0, 100]", 2)
        return int(total_cost * pct / 100)
    m = _SIZE_RE.match(t)
    if m is None:
        raise SmoeError(f"bad budget {text!r}: use bytes (512MiB, 4G) or a percentage (25%)", 2)
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_budget(total_cost: int, core_bytes: int) -> int:
    """All leaves if they fit in available memory less the core and a margin, else what does."""
    avail = psutil.virtual_memory().available - core_bytes - MEMORY_MARGIN
    return max(0, min(total_cost, avail))


def resolve(budget: int | str | None, total_cost: int, core_bytes: int) -> int:
    """A budget option (bytes, text, or None for the default) -> bytes."""
    if budget is None:
        return default_budget(total_cost, core_bytes)
    return budget if isinstance(budget, int) else parse_budget(budget, total_cost)
