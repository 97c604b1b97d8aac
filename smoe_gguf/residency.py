"""Residency: which leaves are in the X-Slot, under a byte budget that always holds.

Every leaf is charged its worst-case page footprint (a slice that is not a page multiple can
touch one page more than its length suggests, and pages are what the system counts), so the
bytes the kernel reports as resident in the X-Slot never exceed the budget. The leaves the gate
asks for at a layer are in use by that layer's matmuls and are never evicted to make room for
each other; the engine sizes the micro-batch so that one layer's working set always fits.
"""

from __future__ import annotations

import mmap
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import SmoeError
from .policy import AccessState, Policy, make_policy
from .store import LeafStore
from .xslot import XSlot

PAGE = mmap.PAGESIZE


def page_cost(nbytes: int) -> int:
    """Most bytes of pages a slice of ``nbytes`` can touch in page-aligned tensors of such slices."""
    if nbytes % PAGE == 0:
        return nbytes
    return (-(-nbytes // PAGE) + 1) * PAGE


@dataclass
class ResidencyStats:
    hits: int = 0
    misses: int = 0
    leaves_loaded: int = 0
    evictions: int = 0
    stall_seconds: float = 0.0  # time the gate spent bringing leaves in
    peak_bytes: int = 0  # peak of charged bytes
    gates: int = 0
    per_layer_misses: dict[int, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 1.0


class Residency:
    """Leaves (layer, expert) in an X-Slot, fed from a LeafStore, under ``budget`` bytes.

    The access state (``state``) is shared with the gate's C path, which serves hits by itself
    and stamps them; this class sees misses only, and hits of gates that also had a miss.
    """

    def __init__(
        self, xslot: XSlot, store: LeafStore, budget: int, n_layer: int, n_expert: int, policy: str = "lru"
    ) -> None:
        self.xslot = xslot
        self.store = store
        self.budget = budget
        self.used = 0
        self.state = AccessState.new(n_layer, n_expert)
        self.policy: Policy = make_policy(policy)
        self.stats = ResidencyStats()
        self.enabled = True  # False: the gate loads nothing (negative control only)
        self._cost: dict[int, int] = {}
        for (layer, _e), parts in store.leaves.items():
            if layer not in self._cost:
                self._cost[layer] = sum(page_cost(p.length) for p in parts)
                for p in parts:
                    r = xslot.regions.get(p.tensor)
                    if r is None or r.slice_bytes != p.length:
                        raise SmoeError(f"X-Slot has no {p.length}-byte slices of {p.tensor}: pack and model differ")
        self.total_cost = sum(self._cost[layer] for (layer, _e) in store.leaves)

    def leaf_cost(self, layer: int) -> int:
        return self._cost[layer]

    @property
    def max_leaf_cost(self) -> int:
        return max(self._cost.values())

    @property
    def n_resident(self) -> int:
        return int(np.count_nonzero(self.state.resident))

    def holds_everything(self) -> bool:
        """Every leaf resident (under a budget that holds them all): nothing left to gate."""
        return self.used == self.total_cost

    def on_experts(self, layer: int, ids: np.ndarray) -> None:
        """The gate's hook: make every leaf in ``ids`` of ``layer`` resident, evicting others."""
        self.stats.gates += 1
        if not self.enabled:
            return
        wanted = np.unique(ids).tolist() if ids.size > 1 else [int(ids.flat[0])]
        s = self.state
        now = s.tick()
        resident = s.resident[layer]
        t0 = None
        for e in wanted:
            if resident[e]:
                self.stats.hits += 1
                continue
            if t0 is None:
                t0 = time.perf_counter()
            self.stats.misses += 1
            self.stats.per_layer_misses[layer] = self.stats.per_layer_misses.get(layer, 0) + 1
            cost = self._cost[layer]
            self._make_room(cost, layer, wanted)
            self._load(layer, e)
            resident[e] = 1
            self.used += cost
            self.stats.peak_bytes = max(self.stats.peak_bytes, self.used)
        s.record(layer, wanted, now)
        if t0 is not None:
            self.stats.stall_seconds += time.perf_counter() - t0

    def _make_room(self, cost: int, layer: int, in_use: list[int]) -> None:
        if self.used + cost <= self.budget:
            return
        s = self.state
        evictable = s.resident.astype(bool) & ~s.pinned.astype(bool)
        evictable[layer, in_use] = False  # the node being gated reads these
        while self.used + cost > self.budget:
            victim = self.policy.victim(s, evictable, layer)
            if victim is None:
                raise SmoeError(
                    f"X-Slot budget {self.budget} bytes cannot hold one layer's selected leaves "
                    f"({len(in_use)} x {cost} bytes): raise --budget or lower the micro-batch"
                )
            evictable[victim] = False
            self.evict(victim)

    def evict(self, key: tuple[int, int]) -> None:
        layer, e = key
        for p in self.store.parts(layer, e):
            self.xslot.evict_slice(p.tensor, e)
        self.state.resident[layer, e] = 0
        self.used -= self._cost[layer]
        self.stats.evictions += 1

    def _load(self, layer: int, e: int) -> None:
        for i, p in enumerate(self.store.parts(layer, e)):
            self.xslot.fill_slice(p.tensor, e, lambda view, i=i: self.store.read_part(layer, e, i, view))
        self.stats.leaves_loaded += 1

    def set_budget(self, budget: int) -> None:
        """Change the budget live; shrinking evicts at once (policy order)."""
        self.budget = budget
        self._make_room(0, 0, [])

    def clear(self) -> None:
        for layer, e in zip(*np.nonzero(self.state.resident)):
            self.evict((int(layer), int(e)))
