"""Residency: which leaves are in the X-Slot, under a byte budget that always holds.

Every leaf is charged its worst-case page footprint (a slice that is not a page multiple can
touch one page more than its length suggests, and pages are what the system counts), so the
bytes the kernel reports as resident in the X-Slot never exceed the budget. The leaves the gate
asks for at a layer are in use by that layer's matmuls and are never evicted to make room for
each other; the engine sizes the micro-batch so that one layer's working set always fits.

Fetching. A miss is loaded by the gate's thread while the graph waits (a stall). Leaves can also
be *prefetched*: :meth:`Residency.prefetch` (called from the gate's thread, at a graph node or
between decodes) charges the budget at once, evicting if it must, and hands the leaf to a
background I/O thread that fills it while llama.cpp computes; the leaf becomes visible to the
gate (``state.resident``) only when its bytes are complete. All evictions happen in the gate's
thread, at moments when the only leaves being read are those of the node being gated, which are
protected, so a prefetch never evicts a leaf in use. A gate that needs a leaf still queued
loads it itself; one already being read waits for it (the wait is stall time, per layer).
"""

from __future__ import annotations

import mmap
import threading
import time
from collections import deque
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
    hits: int = 0  # leaves found resident by a gate seen in Python (the C path counts its own)
    misses: int = 0  # leaves a gate needed that were not resident (loaded or waited for)
    late: int = 0  # ... of which a prefetch was already bringing in
    leaves_loaded: int = 0  # by the gate's thread
    prefetched: int = 0  # leaves loaded by the I/O thread
    prefetch_wasted: int = 0  # prefetched leaves evicted before any gate used them
    evictions: int = 0
    stall_seconds: float = 0.0  # time the gate spent bringing leaves in or waiting for them
    peak_bytes: int = 0  # peak of charged bytes (resident + in flight)
    gates: int = 0
    per_layer_misses: dict[int, int] = field(default_factory=dict)
    per_layer_stall: dict[int, float] = field(default_factory=dict)


_QUEUED, _LOADING = 1, 2


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
        self.used = 0  # charged bytes: resident leaves and leaves in flight
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
        # in flight: leaf -> _QUEUED | _LOADING; guarded by _cv
        self._flight: dict[tuple[int, int], int] = {}
        self._queue: deque[tuple[int, int]] = deque()
        self._unused_prefetch: set[tuple[int, int]] = set()
        self._failed: dict[tuple[int, int], BaseException] = {}
        self._cv = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closing = False

    def leaf_cost(self, layer: int) -> int:
        return self._cost[layer]

    @property
    def max_leaf_cost(self) -> int:
        return max(self._cost.values())

    @property
    def n_resident(self) -> int:
        return int(np.count_nonzero(self.state.resident))

    @property
    def in_flight(self) -> int:
        return len(self._flight)

    def holds_everything(self) -> bool:
        """Every leaf resident (under a budget that holds them all): nothing left to gate."""
        return self.used == self.total_cost and not self._flight

    # ------------------------------------------------------------------ the gate's hook

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
            key = (layer, e)
            if resident[e]:
                self.stats.hits += 1
                self._unused_prefetch.discard(key)
                continue
            if t0 is None:
                t0 = time.perf_counter()
            self.stats.misses += 1
            self.stats.per_layer_misses[layer] = self.stats.per_layer_misses.get(layer, 0) + 1
            if key in self._flight and self._claim_or_wait(key):
                self.stats.late += 1
                self._unused_prefetch.discard(key)
                continue
            cost = self._cost[layer]
            self._make_room(cost, layer, wanted)
            self.used += cost
            self.stats.peak_bytes = max(self.stats.peak_bytes, self.used)
            try:
                self._load(layer, e)
            except BaseException:
                self.used -= cost
                raise
            resident[e] = 1
            self.stats.leaves_loaded += 1
        s.record(layer, wanted, now)
        if t0 is not None:
            dt = time.perf_counter() - t0
            self.stats.stall_seconds += dt
            self.stats.per_layer_stall[layer] = self.stats.per_layer_stall.get(layer, 0.0) + dt

    def _claim_or_wait(self, key: tuple[int, int]) -> bool:
        """A leaf the gate needs is in flight: take it back if still queued (False: load it
        yourself, its charge is released), else wait until the I/O thread is done (True)."""
        with self._cv:
            if self._flight.get(key) == _QUEUED:
                del self._flight[key]
                self._queue.remove(key)
                self.used -= self._cost[key[0]]
                return False
            while key in self._flight:
                self._cv.wait()
            err = self._failed.pop(key, None)
        if err is not None:
            self.used -= self._cost[key[0]]
            return False  # load it here: the error, if it persists, is raised with its message
        return True

    def reap_failures(self) -> None:
        """Release the charge of prefetches that failed and that no gate needed (gate thread)."""
        if self._failed:
            with self._cv:
                failed, self._failed = self._failed, {}
            for key in failed:
                self.used -= self._cost[key[0]]

    def _make_room(self, cost: int, layer: int, in_use: list[int]) -> bool:
        """Evict until ``cost`` more bytes fit, never a leaf of ``in_use`` at ``layer``, a pinned
        one or one in flight. Raises if impossible."""
        if self.used + cost <= self.budget:
            return True
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
        return True

    def evict(self, key: tuple[int, int]) -> None:
        """Release a resident leaf (gate thread only)."""
        layer, e = key
        self.state.resident[layer, e] = 0
        for p in self.store.parts(layer, e):
            self.xslot.evict_slice(p.tensor, e)
        self.used -= self._cost[layer]
        self.stats.evictions += 1
        if key in self._unused_prefetch:
            self._unused_prefetch.discard(key)
            self.stats.prefetch_wasted += 1

    def _load(self, layer: int, e: int) -> None:
        for i, p in enumerate(self.store.parts(layer, e)):
            self.xslot.fill_slice(p.tensor, e, lambda view, i=i: self.store.read_part(layer, e, i, view))

    # ------------------------------------------------------------------ prefetch

    def prefetch(self, keys: list[tuple[int, int]], layer: int = 0, in_use: list[int] | None = None,
                 evict: bool = True) -> int:
        """Queue ``keys`` for the I/O thread (gate thread only). Each is charged now; room is
        made by evicting (unless ``evict`` is false), never a leaf of ``in_use`` at ``layer``,
        nor one just queued. Stops at the first leaf that does not fit. Returns how many were queued."""
        if not self.enabled:
            return 0
        s = self.state
        queued = 0
        protect = list(in_use or [])
        for key in keys:
            kl, ke = key
            if s.resident[kl, ke] or key in self._flight:
                continue
            cost = self._cost[kl]
            if self.used + cost > self.budget:
                if not evict:
                    break
                evictable = s.resident.astype(bool) & ~s.pinned.astype(bool)
                evictable[layer, protect] = False
                for qk in keys[: keys.index(key)]:
                    evictable[qk] = False
                while self.used + cost > self.budget:
                    victim = self.policy.victim(s, evictable, layer)
                    if victim is None:
                        return queued
                    evictable[victim] = False
                    self.evict(victim)
            self.used += cost
            self.stats.peak_bytes = max(self.stats.peak_bytes, self.used)
            with self._cv:
                self._flight[key] = _QUEUED
                self._queue.append(key)
                self._cv.notify_all()
            queued += 1
        if queued:
            self._ensure_worker()
        return queued

    def _ensure_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="smoe-io", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if self._closing:
                    return
                key = self._queue.popleft()
                self._flight[key] = _LOADING
            layer, e = key
            err: BaseException | None = None
            try:
                self._load(layer, e)
            except BaseException as ex:  # noqa: BLE001 - reported to the gate that needs it
                err = ex
            with self._cv:
                if err is None:
                    self.state.resident[layer, e] = 1
                    self.state.last_use[layer, e] = self.state.clock[0]  # recent: not the first victim
                    self._unused_prefetch.add(key)
                    self.stats.prefetched += 1
                else:  # its charge is released by the gate thread (reap_failures / _claim_or_wait)
                    self._failed[key] = err
                del self._flight[key]
                self._cv.notify_all()

    def drain(self) -> None:
        """Wait until nothing is in flight."""
        with self._cv:
            while self._flight:
                self._cv.wait()

    def close(self) -> None:
        with self._cv:
            self._queue.clear()
            for key, st in list(self._flight.items()):
                if st == _QUEUED:
                    del self._flight[key]
                    self.used -= self._cost[key[0]]
            self._closing = True
            self._cv.notify_all()
            while self._flight:
                self._cv.wait()
        if self._worker is not None:
            self._worker.join()
            self._worker = None

    # ------------------------------------------------------------------ budget

    def set_budget(self, budget: int) -> None:
        """Change the budget live; shrinking evicts at once (policy order)."""
        self.drain()
        self.budget = budget
        self._make_room(0, 0, [])

    def clear(self) -> None:
        self.drain()
        for layer, e in zip(*np.nonzero(self.state.resident)):
            self.evict((int(layer), int(e)))
