"""Residency: which leaves are in the X-Slot, under a byte budget that always holds.

Every leaf is charged its worst-case page footprint (a slice that is not a page multiple can
touch one page more than its length suggests, and pages are what the system counts), so the
bytes the kernel reports as resident in the X-Slot never exceed the budget. The leaves the gate
asks for at a layer are in use by that layer's matmuls and are never evicted to make room for
each other; the engine sizes the micro-batch so that one layer's working set always fits.

Fetching. A miss is loaded by the gate's thread while the graph waits (a stall). Leaves can also
be *prefetched*: :meth:`Residency.prefetch` (called from the gate's thread, at a graph node or
between decodes) charges the budget at once, evicting if it must, and hands the leaf to a
background I/O threads that fill it while llama.cpp computes; the leaf becomes visible to the
gate (``state.resident``) only when its bytes are complete. All evictions happen in the gate's
thread, at moments when the only leaves being read are those of the node being gated, which are
protected, so a prefetch never evicts a leaf in use. A gate that needs a leaf still queued
loads it itself; one already being read waits for it (the wait is stall time, per layer).

Prediction. Leaves marked in ``state.protect`` (the next layers' guesses, see
:mod:`smoe_gguf.speculate`) are not evicted while any other leaf can go; a layer's marks are
cleared when its gate is served. Prefetches carry a priority (the caller's probability that a
gate uses the leaf) and a source name; what each source's prefetches saved in stall is counted
(:class:`~smoe_gguf.paging_stats.PrefetchCounts`). :meth:`Residency.eviction_regret` estimates
how likely an evicted leaf is to be needed again soon: what a prefetch that evicts costs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import numpy.ma  # noqa: F401  np.unique imports it at its first call: here, not inside a prompt's first gate

from . import budget as bdg
from .errors import SmoeError
from .fetcher import HOLD_BELOW, TABLE_NATIVE, TABLE_OTHER, Fetcher
from .pager import LANDED, LANDED_CANCELLED, NATIVE_SOURCE, TAKEN, NativePager
from .paging_stats import ResidencyStats
from .policy import AccessState, Policy, make_policy
from .store import LeafStore
from .trace import Trace
from .xslot import XSlot

Key = tuple[int, int]
FillMany = Callable[[list[Key], "int | None", bool], None]  # (leaves, stage or None, urgent)

REGRET_TOKENS = 2  # a miss on a leaf evicted less than this many passes over the layers ago is a regret
# Python threads that hand prefetched leaves to the readers (each reads one leaf's parts at once):
# more only contend for the GIL and the cores; the readers themselves run io_depth reads at once.
MAX_IO_THREADS = 4
# what a prefetch's read costs, in misses: where decode waits on the disk, a wasted read holds the
# disk from a gate's miss for as long as that miss's own read takes, less what overlaps compute
# (decode that waits on the disk overlaps little: its time follows the bytes read)
READ_COST = 0.7
# what a guess for a layer beyond the next one must add to its chance of use to be prefetched: the
# next layer's gate guesses that layer again, more precisely, so its prefetch buys only lead time,
# and one it then drops is a wasted read (protecting it costs nothing, and it still is)
AHEAD_COST = 0.2


class Residency:
    """Leaves (layer, expert) in an X-Slot, fed from a LeafStore, under ``budget`` bytes.

    The access state (``state``) is shared with the gate's C path, which serves hits by itself
    and stamps them; this class sees misses only, and hits of gates that also had a miss.
    """

    def __init__(
        self,
        cost: dict[int, int],
        n_expert: int,
        budget: int,
        policy: str = "lru",
        fill: Callable[[int, int, int | None], None] | None = None,
        release: Callable[[int, int], None] | None = None,
        recycle: Callable[[int, int, int, int], int] | None = None,
        fill_many: FillMany | None = None,
        io_depth: int = 1,
        stage_cost: dict[int, tuple[int, int]] | None = None,
        release_stage: Callable[[list[Key], int], None] | None = None,
    ) -> None:
        """``cost[layer]``: bytes charged per leaf of that layer. ``fill(layer, expert, stage)``
        brings a leaf's parts of ``stage`` (None: all) in (any thread); ``fill_many(keys, stage,
        urgent)`` brings several leaves' parts in at once (default: ``fill`` for each), urgent
        ones ahead of background reads, and on failure leaves none of them filled.
        ``release(layer, expert)`` gives them back (gate thread); without them the residency only
        keeps the books (replay). ``recycle(layer, expert, to_layer, to_expert)`` (gate thread)
        releases a leaf evicted to make room for another, giving its pages to that one (which is
        then filled or released). ``io_depth``: how many prefetched leaves are read at once (at
        most MAX_IO_THREADS). ``stage_cost[layer]``: what a leaf's gate/up parts (stage 0) and its
        down parts (stage 1) are charged on their own, and ``release_stage(keys, stage)`` gives
        one stage's pages of those leaves back: with both, a prompt micro-batch whose leaves do not fit
        whole is served part by part (:attr:`split_prompts`, :meth:`on_experts`)."""
        # the budget ledger, shared with the native pager: [0] charged bytes (resident leaves and
        # leaves in flight), [1] the budget
        self.ledger = np.array([0, budget], np.int64)
        self.n_layer = 1 + max(cost)
        self.state = AccessState.new(self.n_layer, n_expert)
        self.policy: Policy = make_policy(policy)
        self.stats = ResidencyStats()
        self.native: NativePager | None = None  # serves gate misses in C where it can (Residency.over)
        self.native_prefetches = True  # likely prefetches that may evict are queued by the native pager
        self._enabled = True
        self._pipeline = False
        self.trace: Trace | None = None  # where trace_gate records every gate's accesses
        self._cost = dict(cost)
        one = fill or (lambda layer, e, stage: None)
        self._release = release or (lambda layer, e: None)

        def each(keys: list[Key], stage: int | None, urgent: bool) -> None:
            for i, (layer, e) in enumerate(keys):
                try:
                    one(layer, e, stage)
                except BaseException:
                    for k in keys[:i]:
                        self._release(*k)
                    raise

        self._fill_many: FillMany = fill_many or each
        self._recycle = recycle
        self.total_cost = n_expert * sum(self._cost.values())
        # the I/O threads and what is in flight; part reads are urgent (a layer's matmul waits for them)
        self.fetcher = Fetcher(lambda layer, e, stage: self._fill_many([(layer, e)], stage, stage is not None),
                               self._landed, workers=min(io_depth, MAX_IO_THREADS))
        self._down_pending: dict[int, list[tuple[int, int]]] = {}  # layer -> leaves awaiting their down parts
        self._stage_cost = dict(stage_cost or {})
        self._release_stage = release_stage or (lambda keys, stage: None)
        # Part by part (see on_experts): set by the engine where a prompt micro-batch may select more
        # leaves than fit whole; the gate then stops at the down node of a layer served so
        self.split_prompts = False
        self._split: dict[int, tuple[list[Key], list[int]]] = {}  # layer -> (its gate/up-only leaves, wanted)
        self._split_down: list[Key] = []  # leaves whose down parts only are in: dropped at the next gate
        # Read ahead (the orchestrator): a part-by-part layer's down parts that fit beside its gate/up
        # parts are read by the I/O threads while the gate/up matmuls run, not at the down node
        self.down_ahead = False
        self._early_down: dict[int, list[Key]] = {}  # layer -> its leaves whose down parts are read ahead
        # ... and the next layer's guessed leaves' gate/up parts that fit beside a layer's down parts
        # are read while its down matmul runs (speculation's guesses, kept by prefetch)
        self.up_ahead = False
        self._guess_up: tuple[int, list[Key]] | None = None  # (layer, its guessed leaves) of a part-by-part prompt
        self._early_up: dict[int, list[Key]] = {}  # layer -> its guessed leaves whose gate/up parts are read ahead
        self._unused_prefetch: dict[tuple[int, int], int] = {}  # landed, not yet used: clock at landing
        self._source: dict[tuple[int, int], str] = {}  # queued, in flight or landed unused: who asked
        self.evicted_at = np.zeros((self.n_layer, n_expert), np.uint64)  # clock of the last eviction
        self.regret_window = REGRET_TOKENS * len(self._cost)
        self.flight_table = np.zeros((self.n_layer, n_expert), np.uint8)  # 1: queued or being read (native pager)
        self.fetcher.flight.table = self.flight_table

    @classmethod
    def over(cls, xslot: XSlot, store: LeafStore, budget: int, n_expert: int, policy: str = "lru",
             native: bool = True) -> "Residency":
        """Leaves of ``store`` paged into ``xslot``: each batch of leaves is read by the store's
        reader threads at once, straight into the slices. ``native``: a native pager serves
        the gate's misses where it can (else this class serves every one)."""
        cost: dict[int, int] = {}
        stage_cost: dict[int, tuple[int, int]] = {}
        unloaded: set[int] = set()  # layers llama.cpp does not load (MTP blocks): never paged
        for (layer, _e), parts in store.leaves.items():
            if layer not in cost and layer not in unloaded:
                if not any(p.tensor in xslot.regions for p in parts):
                    unloaded.add(layer)
                    continue
                cost[layer] = bdg.leaf_cost(p.length for p in parts)
                stage_cost[layer] = bdg.stage_costs((p.stage, p.length) for p in parts)
                for p in parts:
                    r = xslot.regions.get(p.tensor)
                    if r is None or r.slice_bytes != p.length:
                        raise SmoeError(f"X-Slot has no {p.length}-byte slices of {p.tensor}: pack and model differ")
        if not cost:
            raise SmoeError("llama.cpp loaded none of the expert tensors: pack and model differ")

        def fill_many(keys: list[Key], stage: int | None, urgent: bool) -> None:
            items: list[tuple[int, int, int, int]] = []
            claimed: list[tuple[str, int]] = []
            for layer, e in keys:
                for i, p in enumerate(store.parts(layer, e)):
                    if stage is None or p.stage == stage:
                        items.append((layer, e, i, xslot.claim_slice(p.tensor, e)))
                        claimed.append((p.tensor, e))
            try:
                store.read_parts(items, urgent)
            except BaseException:
                for name, e in claimed:
                    xslot.evict_slice(name, e)
                raise

        def release(layer: int, e: int) -> None:
            for p in store.parts(layer, e):
                xslot.evict_slice(p.tensor, e)

        def release_stage(keys: list[Key], stage: int) -> None:
            by_tensor: dict[str, list[int]] = {}  # a tensor's slices go together: one call per run of them
            for layer, e in keys:
                for p in store.parts(layer, e):
                    if p.stage == stage:
                        by_tensor.setdefault(p.tensor, []).append(e)
            for tensor, experts in by_tensor.items():
                xslot.evict_slices(tensor, experts)

        def recycle(layer: int, e: int, to_layer: int, to_e: int) -> int:
            # part by part; a part whose slice differs in size from its counterpart's is released
            parts, to_parts = store.parts(layer, e), store.parts(to_layer, to_e)
            if len(parts) != len(to_parts):
                release(layer, e)
                return 0
            return sum(xslot.move_slice(p.tensor, e, q.tensor, to_e) for p, q in zip(parts, to_parts, strict=True))

        if bdg.stage_leaf_cost(stage_cost.values()) is None:
            stage_cost = {}  # a leaf without parts of both stages is never served part by part
        r = cls(cost, n_expert, budget, policy, release=release, recycle=recycle, fill_many=fill_many,
                io_depth=store.io_depth, stage_cost=stage_cost, release_stage=release_stage)
        if native and all(len({p.path for p in parts}) == 1 for parts in store.leaves.values()):  # one shard per leaf
            r.native = NativePager(r, xslot, store, r.flight_table, r.fetcher.flight.signal)
            r._sync_native()
        return r

    # ------------------------------------------------------------------ what the native pager may do

    @property
    def used(self) -> int:
        """Charged bytes: resident leaves and leaves in flight."""
        return int(self.ledger[0])

    @used.setter
    def used(self, value: int) -> None:
        self.ledger[0] = value

    @property
    def budget(self) -> int:
        return int(self.ledger[1])

    @budget.setter
    def budget(self, value: int) -> None:
        self.ledger[1] = value

    @property
    def enabled(self) -> bool:
        """False: the gate loads nothing (negative control only)."""
        return self._enabled

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self._enabled = on
        self._sync_native()

    @property
    def pipeline(self) -> bool:
        """Gate/up parts at the top-k gate, down parts by the I/O threads until finish_layer."""
        return self._pipeline

    @pipeline.setter
    def pipeline(self, on: bool) -> None:
        self._pipeline = on
        self._sync_native()

    def _sync_native(self) -> None:
        if self.native is not None:
            self.native.enabled = self._enabled and not self._pipeline

    def trace_gate(self, layer: int, _node: int, ids: np.ndarray) -> None:
        """A gate observer that records the gate in :attr:`trace` (called before its misses are
        read, so its hits are what was resident)."""
        if self.trace is None or not self._enabled:
            return
        wanted = np.unique(ids).tolist() if ids.size > 1 else [int(ids.flat[0])]
        resident = self.state.resident[layer]
        self.trace.gate(layer, ids, wanted, [bool(resident[e]) for e in wanted], bool(self.state.scan[0]))

    def drain_native(self) -> None:
        """Take in what the native pager did since the last call: its counts into :attr:`stats`,
        its evictions and the prefetches it took or waited for into the prefetch accounting
        (gate thread, between gates)."""
        nat = self.native
        if nat is None or not nat.pending:
            return
        landings, queued = nat.take_landings()  # before the flights: a gate may have waited for one
        self.stats.source(NATIVE_SOURCE).queued += queued
        for key, what, clock in landings:  # Python's asker where it queued the leaf, else speculation in C
            if what == LANDED:
                self._unused_prefetch[key] = clock
                self._source.setdefault(key, NATIVE_SOURCE)
                self.stats.prefetched += 1
            elif what == LANDED_CANCELLED:
                self.stats.prefetch_cancelled += 1
                self.stats.source(self._source.pop(key, NATIVE_SOURCE)).cancelled += 1
            else:  # failed: reaped
                self._source.pop(key, None)
        for key, event, waited_ns in nat.take_flights():  # before the evictions: a leaf may be both
            if event == TAKEN:  # read by the gate, still charged: nothing saved
                self.fetcher.forget_taken(key)
                self._claimed(key)
            else:
                self._credit(key, waited_ns * 1e-9, late=True)
        for key, last_use in nat.take_evictions():
            self._forget_prefetch(key, last_use)
        c = nat.take_counts()
        st = self.stats
        st.gates += c.gates
        st.misses += c.misses
        st.leaves_loaded += c.loaded
        st.evictions += c.evictions
        st.regrets += c.regrets
        st.native_gates += c.gates
        st.native_fallbacks += c.fallbacks
        st.moved_bytes += c.moved_bytes
        st.stall_seconds += c.stall_ns * 1e-9
        st.load_seconds += c.stall_ns * 1e-9
        st.peak_bytes = max(st.peak_bytes, c.peak)
        for layer, n in (c.layer_misses or {}).items():
            st.per_layer_misses[layer] = st.per_layer_misses.get(layer, 0) + n
        for layer, ns in (c.layer_stall_ns or {}).items():
            st.per_layer_stall[layer] = st.per_layer_stall.get(layer, 0.0) + ns * 1e-9

    @property
    def costs(self) -> dict[int, int]:
        """Bytes charged per leaf, by layer."""
        return dict(self._cost)

    def leaf_cost(self, layer: int) -> int:
        return self._cost[layer]

    @property
    def max_leaf_cost(self) -> int:
        return max(self._cost.values())

    def micro_batch(self, n_expert_used: int, n_ubatch: int, budget: int | None = None,
                    split: bool = False) -> int:
        """The largest micro-batch (<= ``n_ubatch``) whose leaves at one layer always fit
        ``budget`` (default: the current one): whole, or (``split``, where leaves have parts of
        both stages) one stage of them at a time."""
        b = self.budget if budget is None else budget
        cost = self.max_stage_cost if split and self.can_split else self.max_leaf_cost
        return bdg.micro_batch(b, cost, self.state.n_expert, n_expert_used, n_ubatch)

    @property
    def stage_costs(self) -> dict[int, tuple[int, int]]:
        """Per layer, what a leaf's gate/up parts and down parts are charged on their own (empty:
        leaves are served whole only)."""
        return dict(self._stage_cost)

    @property
    def can_split(self) -> bool:
        """Whether a gate can serve leaves part by part (every leaf has parts of both stages)."""
        return bool(self._stage_cost)

    @property
    def max_stage_cost(self) -> int:
        """The most one stage of a leaf is charged (what a gate serving part by part needs per leaf)."""
        return bdg.stage_leaf_cost(self._stage_cost.values()) or self.max_leaf_cost

    @property
    def n_resident(self) -> int:
        return int(np.count_nonzero(self.state.resident))

    @property
    def in_flight(self) -> int:
        """Leaves queued or being read (gate thread: what the native pager took is settled first)."""
        self.drain_native()
        return len(self.fetcher)

    def holds_everything(self) -> bool:
        """Every leaf resident (under a budget that holds them all): nothing left to gate."""
        return self.used == self.total_cost and not self.in_flight

    # ------------------------------------------------------------------ the gate's hook

    def on_experts(self, layer: int, ids: np.ndarray) -> None:
        """The gate's hook: make every leaf in ``ids`` of ``layer`` resident, evicting others."""
        self.drain_native()
        self.stats.gates += 1
        if not self.enabled:
            return
        if self._down_pending:  # a layer whose down node was not gated (never expected): finish it now
            self.finish_all()
        early_up = self._early_up.pop(layer, [])
        self._drop_split()  # the layer before this one computed its down matmul
        if ids.size > 1:
            uniq, picks = np.unique(ids, return_counts=True)
            wanted = uniq.tolist()
        else:
            wanted, picks = [int(ids.flat[0])], None
        ahead: list[Key] = []  # misses whose gate/up parts were read ahead (charged for them)
        if early_up:
            picked = set(wanted)
            ahead = [key for key in early_up if key[1] in picked]
            self._drop_up_ahead([key for key in early_up if key[1] not in picked])
            self.stats.up_ahead_used += len(ahead)
        if self.native is not None and self.native.flying:
            awaited = [e for e in wanted if self.flight_table[layer, e] == TABLE_NATIVE]
            for e in awaited:  # native prefetches of these land (or fail: reaped) before this class reads them
                self.native.await_leaf((layer, e))
            if awaited:
                self.drain_native()
        s = self.state
        now = s.tick()
        s.protect[layer] = 0  # served: its guesses are spent
        resident = s.resident[layer]
        t0 = None
        loads: list[Key] = []  # misses read now, in one batch
        landing: list[Key] = []  # misses the I/O threads are reading: waited for after the batch
        fresh: list[Key] = []  # misses nothing is reading yet: charged below
        completing: list[Key] = []  # of ahead, those made whole leaves (their down parts charged)
        in_ahead = set(ahead)
        try:
            for e in wanted:
                key = (layer, e)
                if resident[e]:
                    self.stats.hits += 1
                    if key in self._unused_prefetch:
                        self._credit(key, 0.0)
                    continue
                if t0 is None:
                    t0 = time.perf_counter()
                self.stats.misses += 1
                self.stats.per_layer_misses[layer] = self.stats.per_layer_misses.get(layer, 0) + 1
                if key in in_ahead:
                    continue
                if key in self.fetcher:
                    if not self._claim_queued(key):
                        landing.append(key)
                        continue
                elif self.evicted_at[key] and now - int(self.evicted_at[key]) <= self.regret_window:
                    self.stats.regrets += 1
                fresh.append(key)
            split = self._charge_fresh(layer, fresh, wanted, loads, ahead, completing)
        except BaseException:
            for key in loads:  # charged, not read
                self._unload(key)
            self._drop_up_ahead(ahead)  # (_charge_fresh charges no down part of them where it raises)
            raise
        try:
            self._complete(layer, completing)
        except BaseException:
            for key in loads:
                self._unload(key)
            raise
        self._load(layer, loads)
        if split:
            self._load_split(layer, split, wanted, len(ahead))
        for key in landing:
            tw = time.perf_counter()
            if self._claim_or_wait(key):
                self._credit(key, time.perf_counter() - tw, late=True)
            else:  # its read failed: the gate reads it (an error that persists is raised with its message)
                self._charge_for_gate(key, wanted)
                self._load(layer, [key])
        s.record(layer, wanted, now, picks)
        if t0 is not None:
            self.stats.stalled(layer, time.perf_counter() - t0)

    def _charge_fresh(self, layer: int, fresh: list[Key], wanted: list[int], loads: list[Key],
                      ahead: list[Key], completing: list[Key]) -> list[Key]:
        """Charge the gate's misses whole (into ``loads``), or, where a prompt micro-batch's do not
        all fit whole (:attr:`split_prompts`), their gate/up parts only: returns those leaves.
        ``ahead``: misses whose gate/up parts were read ahead (charged for those). Where the misses
        go whole, their down parts are charged too and they go into ``completing``; else they lead
        the returned leaves. The same leaves are evicted as where they were charged at the gate."""
        if not fresh and not ahead:
            return []
        cost = self._cost[layer]
        if self.split_prompts and self._stage_cost and len(wanted) > 1:
            s = self.state
            hits = sum(1 for e in wanted if s.resident[layer, e])
            pinned = sum(int(np.count_nonzero(s.pinned[lay])) * c for lay, c in self._cost.items())
            if (len(fresh) + len(ahead) + hits) * cost + pinned <= self.budget:  # else they cannot fit whole
                if self._charge_whole(layer, fresh, wanted, loads, ahead, completing):
                    return []
            return list(ahead) + self._charge_split(layer, fresh, wanted)
        if not self._charge_whole(layer, fresh, wanted, loads, ahead, completing):
            raise self._no_room(wanted, cost)
        return []

    def _charge_whole(self, layer: int, fresh: list[Key], wanted: list[int], loads: list[Key],
                      ahead: list[Key], completing: list[Key]) -> bool:
        """Charge ``fresh`` whole (into ``loads``) and the down parts of ``ahead`` (into
        ``completing``), making room; False, with none of it charged, where room cannot be made."""
        for key in fresh:
            if not self._try_charge_for_gate(key, wanted):
                break
            loads.append(key)
        else:
            c1 = self._stage_cost[layer][1] if ahead else 0
            done: list[Key] = []
            for key in ahead:
                if not self._make_room(c1, layer, wanted, for_gate=True):
                    break
                self._charge(c1)
                done.append(key)
            else:
                completing.extend(done)
                return True
            self.used -= len(done) * c1
        for k in loads:
            self._unload(k)
        loads.clear()
        return False

    def _charge_split(self, layer: int, fresh: list[Key], wanted: list[int]) -> list[Key]:
        """Make room for and charge the gate/up parts of ``fresh`` (leaves of ``layer``). Where even
        that does not fit beside this layer's resident wanted leaves, those are evicted one by one
        and served part by part too. Returns the leaves to serve so."""
        c0 = self._stage_cost[layer][0]
        split = list(fresh)
        hits = [(layer, e) for e in wanted if self.state.resident[layer, e]]
        while not self._make_room(len(split) * c0, layer, wanted, for_gate=True):
            if not hits:
                raise SmoeError(
                    f"X-Slot budget {self.budget} bytes cannot hold one layer's selected leaves' gate/up parts "
                    f"({len(split)} x {c0} bytes): raise --budget or lower the micro-batch"
                )
            key = hits.pop()
            self.evict(key)
            split.append(key)
            self.stats.split_rereads += 1  # a hit, read again after all
        self._charge(len(split) * c0)
        return split

    def _load_split(self, layer: int, keys: list[Key], wanted: list[int], n_ahead: int = 0) -> None:
        """Read the gate/up parts of charged leaves of ``layer`` for the gate (the first
        ``n_ahead`` were read ahead: awaited); their down parts come at the layer's down node
        (:meth:`finish_layer`). Until they are dropped, they are in flight to every other path
        (the native pager leaves gates that want them to Python)."""
        ahead = keys[:n_ahead]
        try:
            with self.fetcher.gate_reads():
                self._read_parts(ahead, 0, keys[n_ahead:])
        except BaseException:
            self._release_stage(keys, 0)
            self.used -= len(keys) * self._stage_cost[layer][0]
            for key in ahead:
                self.flight_table[key] = 0
            raise
        # (the gate's stall counts this; load_seconds does not: it prices a whole leaf's read)
        self.stats.split_loads += len(keys)
        for key in keys:
            self.flight_table[key] = TABLE_OTHER
            if self.native is not None:
                self.native.note_open(*key)
        self._split[layer] = (keys, wanted)
        self.state.node_wanted[layer] = 1  # the gate stops at this layer's down node
        if self.native is not None:  # until they are dropped (the next gate in Python), as Python would
            self.native.enabled = False
        if self.down_ahead:
            self._read_down_ahead(layer, keys)

    def _complete(self, layer: int, keys: list[Key]) -> None:
        """Make whole leaves of ``keys`` (misses of ``layer`` whose gate/up parts were read ahead,
        charged whole now): their gate/up reads are awaited and their down parts read (or, with
        pipelining, queued for the down node)."""
        if not keys:
            return
        pipelined = self._pipelined()
        try:
            with self.fetcher.gate_reads():
                self._read_parts(keys, 0)
                if not pipelined:
                    self._fill_many(keys, 1, True)
        except BaseException:
            for key in keys:
                self._unload(key)
                self.flight_table[key] = 0
            raise
        self._loaded(layer, keys, pipelined)

    def _read_up_ahead(self, layer: int) -> None:
        """At ``layer``'s down node: queue the gate/up parts of the next layer's guessed leaves
        (:meth:`prefetch` keeps a part-by-part prompt's guesses) that the budget's free room holds,
        evicting nothing. The I/O threads read them while the down matmul runs; the next layer's
        gate takes those it selects (:meth:`on_experts`) and lets the rest go."""
        guess, self._guess_up = self._guess_up, None
        nxt = min((lay for lay in self._stage_cost if lay > layer), default=None)
        if guess is None or guess[0] != nxt:
            return
        s = self.state
        keys = [key for key in guess[1] if not s.resident[key] and key not in self.fetcher
                and not self.flight_table[key]]
        early = self._queue_parts_ahead(keys, nxt, 0)
        if not early:
            return
        self._early_up[nxt] = early
        self.stats.up_ahead += len(early)
        if self.native is not None:  # the next gate goes to Python, which takes them (or lets them go)
            self.native.enabled = False

    def _drop_up_ahead(self, keys: list[Key]) -> None:
        """Let go of leaves whose gate/up parts were read ahead (waits out reads in progress)."""
        for key in keys:
            self.fetcher.forget_down(key)
            self.flight_table[key] = 0
            self.used -= self._stage_cost[key[0]][0]
        self._release_stage(keys, 0)

    def _read_down_ahead(self, layer: int, keys: list[Key]) -> None:
        """Queue the down parts of as many of ``keys`` (part-by-part leaves of ``layer``, their
        gate/up parts in) as the budget's free room holds, evicting nothing: the I/O threads read
        them while the gate/up matmuls run, and the down node waits for them (:meth:`_finish_split`)."""
        early = self._queue_parts_ahead(keys, layer, 1)
        if early:
            self._early_down[layer] = early
            self.stats.down_ahead += len(early)

    def _queue_parts_ahead(self, keys: list[Key], layer: int, stage: int) -> list[Key]:
        """Charge, and queue on the I/O threads, the parts of ``stage`` of as many of ``keys``
        (leaves of ``layer``) as the budget's free room holds, evicting nothing; returns them."""
        cost = self._stage_cost[layer][stage]
        early = keys[: max(0, self.budget - self.used) // cost]
        self._charge(len(early) * cost)
        for key in early:
            self.fetcher.down(key, stage)  # (its table byte stays TABLE_OTHER while queued or read)
        return early

    def _finish_split(self, layer: int) -> None:
        """At ``layer``'s down node: its part-by-part leaves' gate/up parts go, their down parts come
        (those read ahead are waited for, or read here with the rest where still queued)."""
        keys, wanted = self._split.pop(layer)
        c0, c1 = self._stage_cost[layer]
        self._release_stage(keys, 0)
        self.used -= len(keys) * c0
        early = self._early_down.pop(layer, [])
        rest = keys[len(early):]
        charged = len(early) * c1
        try:
            if not self._make_room(len(rest) * c1, layer, wanted, for_gate=True):
                raise SmoeError(
                    f"X-Slot budget {self.budget} bytes cannot hold one layer's selected leaves' down parts "
                    f"({len(keys)} x {c1} bytes): raise --budget or lower the micro-batch"
                )
            self._charge(len(rest) * c1)
            charged += len(rest) * c1
            with self.fetcher.gate_reads():
                self._read_parts(early, 1, rest)
        except BaseException:
            for key in early:  # (no room for the rest: still on the I/O threads)
                self.fetcher.forget_down(key)
            self._release_stage(keys, 1)
            self.used -= charged
            for key in keys:
                self.flight_table[key] = 0
            if not self._split and not self._split_down:
                self._sync_native()
            raise
        for key in early:
            self.flight_table[key] = TABLE_OTHER  # (the fetcher cleared it) until dropped
        self._split_down.extend(keys)

    def _drop_split(self) -> None:
        """Release what part-by-part leaves hold once their layer is computed (or abandoned): down
        parts, gate/up parts of a layer whose down node never came, and gate/up parts read ahead
        for a gate that did not ask for them."""
        early_up = bool(self._early_up)
        for keys in self._early_up.values():
            self._drop_up_ahead(keys)
        self._early_up.clear()
        if not self._split and not self._split_down:
            if early_up:
                self._sync_native()
            return
        for layer, (keys, _wanted) in list(self._split.items()):
            del self._split[layer]
            early = self._early_down.pop(layer, [])
            for key in early:  # read ahead for a down node that never came
                self.fetcher.forget_down(key)
            self._release_stage(early, 1)
            self.used -= len(early) * self._stage_cost[layer][1]
            self.state.node_wanted[layer] = 0
            self._release_stage(keys, 0)
            for key in keys:
                self.flight_table[key] = 0
            self.used -= len(keys) * self._stage_cost[layer][0]
        self._release_stage(self._split_down, 1)
        for key in self._split_down:
            self.flight_table[key] = 0
            self.used -= self._stage_cost[key[0]][1]
        self._split_down.clear()
        self._sync_native()

    def _charge_for_gate(self, key: Key, wanted: list[int]) -> None:
        """Make room for a leaf the gate needs now (its pages may come from a victim) and charge it."""
        if not self._try_charge_for_gate(key, wanted):
            raise self._no_room(wanted, self._cost[key[0]])

    def _no_room(self, wanted: list[int], cost: int) -> SmoeError:
        return SmoeError(f"X-Slot budget {self.budget} bytes cannot hold one layer's selected leaves "
                         f"({len(wanted)} x {cost} bytes): raise --budget or lower the micro-batch")

    def _try_charge_for_gate(self, key: Key, wanted: list[int]) -> bool:
        """:meth:`_charge_for_gate`, False (nothing charged) where no room can be made."""
        cost = self._cost[key[0]]
        if not self._make_room(cost, key[0], wanted, for_gate=True, into=key):
            self._give_back(key)
            return False
        self._charge(cost)
        return True

    def _charge(self, nbytes: int) -> None:
        """Charge ``nbytes`` to the budget (room already made) and keep its peak."""
        self.used += nbytes
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.used)

    def _load(self, layer: int, keys: list[Key]) -> None:
        """Read charged leaves of ``layer`` for the gate, all at once, ahead of every prefetch;
        on failure none of them stays (their charges are released)."""
        if not keys:
            return
        tl = time.perf_counter()
        pipelined = self._pipelined()
        try:
            with self.fetcher.gate_reads():
                self._fill_many(keys, 0 if pipelined else None, True)
        except BaseException:
            for key in keys:
                self._unload(key)
            raise
        self.stats.load_seconds += time.perf_counter() - tl
        self._loaded(layer, keys, pipelined)

    def _pipelined(self) -> bool:
        """Whether whole leaves read for a gate now come gate/up parts first, their down parts
        read by the I/O threads while the gate/up matmuls run (awaited at the down node): with
        pipelining, and (the orchestrator's read-ahead) while a prompt that may not fit whole is
        gated, where a layer that does fit whole has compute to overlap."""
        return self._pipeline or (self.down_ahead and self.split_prompts and bool(self.state.scan[0]))

    def _loaded(self, layer: int, keys: list[Key], pipelined: bool) -> None:
        """Charged leaves of ``layer`` whose parts are in (``pipelined``: their gate/up parts,
        their down parts queued here): resident (once their down parts are in)."""
        self.stats.leaves_loaded += len(keys)
        if self.native is not None:
            for key in keys:
                self.native.note_open(*key)
        s = self.state
        for key in keys:
            if pipelined:  # resident once its down parts are in (finish_layer)
                self.fetcher.down(key)
                self._down_pending.setdefault(layer, []).append(key)
                if not s.node_wanted[layer]:
                    s.node_wanted[layer] = 1  # the gate stops at this layer's down node
                    self.stats.down_nodes += 1
            else:
                s.resident[key] = 1

    def finish_layer(self, layer: int) -> None:
        """At the node before ``layer``'s down matmul (pipelining, or leaves served part by part):
        its leaves' down parts must be in. Those still queued are read here; those being read are
        waited for (stall)."""
        keys = self._down_pending.pop(layer, None)
        self.state.node_wanted[layer] = 0
        if layer in self._split:
            t0 = time.perf_counter()
            self._finish_split(layer)
            self.stats.stalled(layer, time.perf_counter() - t0, down=True)
        if keys:
            t0 = time.perf_counter()
            try:
                self._read_parts(keys, 1)
            except BaseException:
                for key in keys:  # every leaf of this layer is dropped with it
                    self._unload(key)
                raise
            for key in keys:
                self.state.resident[key] = 1
            self.stats.stalled(layer, time.perf_counter() - t0, down=True)
        if self.up_ahead:
            self._read_up_ahead(layer)

    def finish_all(self) -> None:
        """After a graph: down parts still pending are read; part-by-part leaves are dropped."""
        for layer in list(self._down_pending):
            self.finish_layer(layer)
        self._drop_split()
        self._guess_up = None

    def _read_parts(self, keys: list[Key], stage: int, also: list[Key] | None = None) -> None:
        """Bring in the parts of ``stage`` of ``keys``, queued on the I/O threads
        (:meth:`Fetcher.down`), and of ``also`` (not queued): those still queued are taken back and
        read here with ``also``, at once; those being read are waited for. Afterwards none of
        ``keys`` is in the fetcher, on failure too (the first error is raised; the caller releases
        pages and charges)."""
        mine = [key for key in keys if self.fetcher.take_down(key)]  # still queued: read here, at once
        try:
            if mine or also:
                self._fill_many(mine + (also or []), stage, True)
            for key in keys:
                if key not in mine and (err := self.fetcher.await_down(key)) is not None:
                    raise err
        except BaseException:
            for key in keys:  # waits out reads in progress
                self.fetcher.forget_down(key)
            raise
        for key in keys:
            self.fetcher.done(key)

    def _unload(self, key: Key) -> None:
        """A charged leaf that will not be resident: its pages and its charge go back."""
        self._release(*key)
        self.used -= self._cost[key[0]]

    def _claim_queued(self, key: Key) -> bool:
        """A leaf the gate needs is in flight: take it back if still queued (True: the gate reads
        it, its charge is released); False if an I/O thread is reading it."""
        if not self.fetcher.claim_queued(key):
            return False
        self._taken_back(key)
        return True

    def _claim_or_wait(self, key: tuple[int, int]) -> bool:
        """A leaf the gate needs is in flight: take it back if still queued (False: load it
        yourself, its charge is released), else wait until its I/O thread is done (True)."""
        if self.fetcher.claim(key) or self.fetcher.take_failure(key) is not None:
            self._taken_back(key)
            return False  # load it here: an error, if it persists, is raised with its message
        return True

    def _taken_back(self, key: Key) -> None:
        """A prefetch the gate reads itself (queued, or failed): its charge goes back, nothing saved."""
        self.used -= self._cost[key[0]]
        self._claimed(key)

    def _claimed(self, key: Key) -> None:
        """Count a prefetch that a gate read itself against its asker."""
        name = self._source.pop(key, None)
        if name is not None:
            self.stats.source(name).claimed += 1

    def _credit(self, key: tuple[int, int], waited: float, late: bool = False) -> None:
        """A prefetched leaf was used by a gate (that waited ``waited`` seconds for it: ``late``,
        it was still being read)."""
        self.stats.late += late
        self._unused_prefetch.pop(key, None)
        name = self._source.pop(key, None)
        if name is None:
            return
        c = self.stats.source(name)
        c.used += 1
        c.late += late
        c.stall_saved_seconds += max(0.0, self.stats.seconds_per_load - waited)

    def settle_prefetches(self) -> None:
        """Credit landed prefetches that the gate's C path has used since (gate thread)."""
        self.drain_native()
        last_use = self.state.last_use
        for key, landed in list(self._unused_prefetch.items()):
            if int(last_use[key]) > landed:
                self._credit(key, 0.0)

    def prefetch_bar(self, batch: bool = False) -> float:
        """The cost model: the least chance of use for which a prefetch pays (see :meth:`prefetch_bars`).
        ``batch``: for the layer a prompt micro-batch computes next. A leaf it uses is read, and
        evicted for, at that gate anyway, so only a wasted read costs the bar: it pays when
        p > (1 - p) * bar (a bar at or above 1 would refuse even a leaf sure to be used)."""
        free, full = self.prefetch_bars()
        bar = full if self.used + self.max_leaf_cost > self.budget else free
        return bar / (1.0 + bar) if batch else bar

    def prefetch_bars(self) -> tuple[float, float]:
        """The prefetch bar with room left in the budget, and with the budget full. A read costs
        READ_COST of a miss; where the budget is full, the leaf evicted for it may be missed
        again (:meth:`eviction_regret`)."""
        return READ_COST, READ_COST + self.eviction_regret()

    @staticmethod
    def ahead_cost() -> float:
        """What a guess for a layer beyond the next one adds to the bar to be prefetched
        (AHEAD_COST); it is protected at the plain bar."""
        return AHEAD_COST

    def cancel_below(self, priority: float) -> int:
        """Cancel the queued prefetches less likely than ``priority`` (gate thread); how many."""
        self.drain_native()
        keys = self.fetcher.cancel_below(priority)
        for key in keys:
            self._cancelled(key)
        return len(keys)

    def eviction_regret(self) -> float:
        """The estimated chance that an evicted leaf is missed again within REGRET_TOKENS passes
        over the layers (from this session's evictions, starting from an even guess)."""
        return (self.stats.regrets + 2.0) / (self.stats.evictions + 4.0)

    def reap_failures(self) -> None:
        """Release the charge of prefetches that failed and that no gate needed (gate thread)."""
        for key in self.fetcher.take_failures():
            self._give_back(key)  # parts read or moved in before the failure
            self.used -= self._cost[key[0]]
            self._source.pop(key, None)

    def _make_room(self, cost: int, layer: int, in_use: list[int], also: list[tuple[int, int]] = (),
                   for_gate: bool = False, into: tuple[int, int] | None = None) -> bool:
        """Evict (policy order) until ``cost`` more bytes fit, never a leaf of ``in_use`` at
        ``layer``, one of ``also``, a pinned one or one in flight. For the gate (``for_gate``),
        prefetches are worth less than what the node needs now: once nothing is left to evict,
        queued prefetches are cancelled, least likely first, then protected (predicted) leaves
        may go, then loading prefetches are waited for (they land evictable). Protected leaves
        are never evicted for a prefetch. The room is for leaf ``into`` (if given): the victims'
        pages go to it where they can (:meth:`evict`); the caller fills it or gives them back
        (:meth:`_give_back`). False if it cannot."""
        if self.used + cost <= self.budget:
            return True
        if not for_gate and self.native is not None and self.native.enabled:
            self.reap_failures()  # failed prefetches give their charge back
            if self.native.make_room(cost, layer, list(in_use), also, into):
                return True  # else as below: a prefetch may land meanwhile
        s = self.state
        evictable = None
        protect = True  # predicted leaves stay while anything else can go
        landed = -1  # prefetches landed when evictable was taken (the I/O threads add more)
        while self.used + cost > self.budget:
            if evictable is None:
                self.reap_failures()  # failed prefetches give their charge back
                landed = self.stats.prefetched
                evictable = s.resident.astype(bool) & ~s.pinned.astype(bool)
                if protect:
                    evictable &= ~s.protect.astype(bool)
                evictable[layer, in_use] = False  # the node being gated reads these
                for key in also:
                    evictable[key] = False
                continue
            victim = self.policy.victim(s, evictable, layer)
            if victim is not None:
                evictable[victim] = False
                self.evict(victim, into)
            elif for_gate and self.fetcher.queued:
                self._cancel_or_wait()  # a queued guess is worth less than what the node needs now
                evictable = None
            elif for_gate and self.native is not None and self.native.cancel_or_wait():
                self.drain_native()  # a native prefetch was cancelled, or landed (evictable)
                evictable = None
            elif for_gate and protect and s.protect.any():
                protect = False  # then a resident guess
                self.stats.protect_dropped += 1
                evictable = None
            elif for_gate and len(self.fetcher):
                self._cancel_or_wait()
                evictable = None
            elif self.stats.prefetched != landed or self.fetcher.failed:
                evictable = None  # a prefetch landed (evictable now) or failed since the snapshot
            else:
                return False
        return True

    def _cancel_or_wait(self) -> None:
        """Release the least likely queued prefetch, or wait for a load in progress to land (gate thread)."""
        key = self.fetcher.cancel_least()
        if key is not None:
            self._cancelled(key)
            return
        self.reap_failures()

    def _cancelled(self, key: Key) -> None:
        """A queued prefetch was cancelled: the pages evictions moved to it and its charge go back."""
        self._give_back(key)
        self.used -= self._cost[key[0]]
        self.stats.prefetch_cancelled += 1
        name = self._source.pop(key, None)
        if name is not None:
            self.stats.source(name).cancelled += 1

    def evict(self, key: tuple[int, int], into: tuple[int, int] | None = None) -> None:
        """Release a resident leaf (gate thread only). With ``into``, a leaf that is not resident,
        is charged and is about to be filled, its pages are moved there where the X-Slot can
        (same-size, page-aligned slices) instead of being released and faulted in again."""
        layer, e = key
        s = self.state
        self._forget_prefetch(key, int(s.last_use[key]))
        s.resident[layer, e] = 0
        if into is not None and self._recycle is not None:
            self.stats.moved_bytes += self._recycle(layer, e, *into)
        else:
            self._release(layer, e)
        self.used -= self._cost[layer]
        self.stats.evictions += 1
        self.evicted_at[key] = s.clock[0]

    def _forget_prefetch(self, key: Key, last_use: int) -> None:
        """An evicted leaf (``last_use``: its last use then) that was prefetched and not known to be
        used yet: used if a gate the C path served used it since it landed, else wasted."""
        landed = self._unused_prefetch.get(key)
        if landed is None:
            return
        if last_use > landed:
            self._credit(key, 0.0)  # used by a gate the C path served
            return
        del self._unused_prefetch[key]
        self.stats.prefetch_wasted += 1
        name = self._source.pop(key, None)
        if name is not None:
            self.stats.source(name).wasted += 1

    # ------------------------------------------------------------------ prefetch

    def prefetch(self, keys: list[tuple[int, int]], layer: int = 0, in_use: list[int] | None = None,
                 evict: bool = True, priority: float | Sequence[float] = 1.0,
                 source: str | Sequence[str] = "other") -> int:
        """Queue ``keys`` for reading (gate thread only). Each is charged now; room is made by
        evicting (unless ``evict`` is false), never a leaf of ``in_use`` at ``layer``, a
        protected one, nor one just queued. Stops at the first leaf that does not fit.
        ``priority`` (one for all, or one per key): the chance a gate uses the leaf. Where room
        may be made, the native pager queues the likely ones (at least HOLD_BELOW); the rest go
        to the I/O threads, in priority order, which hold them while a gate reads. ``source``
        (one for all, or one per key) names the asker in the counts. Returns how many were
        queued."""
        if not self.enabled:
            return 0
        if self.split_prompts and self.state.scan[0]:
            # a prompt whose micro-batches may not fit whole: every leaf goes to its gates; the
            # next layer's guesses have their gate/up parts read ahead at this one's down node
            if self.up_ahead:
                nxt = min((kl for kl, _e in keys if kl > layer), default=None)
                self._guess_up = None if nxt is None else (nxt, [key for key in keys if key[0] == nxt])
            return 0
        self.drain_native()
        s = self.state
        queued = 0
        protect = list(in_use or [])
        prios = [float(priority)] * len(keys) if isinstance(priority, (int, float)) else list(priority)
        sources = [source] * len(keys) if isinstance(source, str) else list(source)
        nat = self.native
        if evict and self.native_prefetches and nat is not None and nat.enabled:
            # the likely ones are queued by the native pager; the rest wait on the I/O threads
            likely = [i for i, p in enumerate(prios) if p >= HOLD_BELOW]
            if likely:
                queued = self._prefetch_native(nat, [keys[i] for i in likely], layer, protect,
                                               [prios[i] for i in likely], [sources[i] for i in likely])
                rest = [i for i, p in enumerate(prios) if p < HOLD_BELOW]
                keys, prios, sources = [keys[i] for i in rest], [prios[i] for i in rest], [sources[i] for i in rest]
        for i, key in enumerate(keys):
            kl, ke = key
            if s.resident[kl, ke] or key in self.fetcher or self.flight_table[kl, ke] or kl not in self._cost:
                continue  # resident, on its way, or of a layer without paged experts
            cost = self._cost[kl]
            if self.used + cost > self.budget and (
                    not evict or not self._make_room(cost, layer, protect, keys[:i], into=key)):
                self._give_back(key)
                break
            self._charge(cost)
            self._source[key] = sources[i]
            self.stats.source(sources[i]).queued += 1
            self.fetcher.prefetch(key, prios[i])
            queued += 1
        return queued

    def _prefetch_native(self, nat: NativePager, keys: list[Key], layer: int, in_use: list[int],
                         prios: list[float], sources: list[str]) -> int:
        """:meth:`prefetch` by the native pager (likely leaves, room made by eviction): the same
        books, read on the reader pool without an I/O thread of this class."""
        s = self.state
        todo: list[Key] = []
        todo_prios: list[float] = []
        todo_sources: list[str] = []
        for key, p, source in zip(keys, prios, sources, strict=True):
            kl, ke = key
            if s.resident[kl, ke] or self.flight_table[kl, ke] or kl not in self._cost:
                continue  # resident, on its way, or of a layer without paged experts
            if not nat.has_shard(key):
                nat.note_open(kl, ke)
                if not nat.has_shard(key):
                    continue  # a gate reads it, and names what is wrong with its shard
            todo.append(key)
            todo_prios.append(p)
            todo_sources.append(source)
        queued = nat.prefetch(todo, todo_prios, layer, in_use) if todo else 0
        # the pager queues a prefix of them: it stops at the first without room
        for key, source in zip(todo[:queued], todo_sources, strict=False):
            self._source[key] = source
            self.stats.source(source).queued += 1
        return queued

    def _landed(self, key: tuple[int, int], priority: float) -> None:
        """A prefetched leaf is complete (I/O thread, fetcher lock held): the gate may use it.
        A likely one counts as just used (not the first victim); an unlikely guess (below
        HOLD_BELOW: a warm start, a branch) keeps its last use, so it goes before what was used."""
        layer, e = key
        s = self.state
        s.resident[layer, e] = 1
        now = int(s.clock[0])
        if priority >= HOLD_BELOW:  # its lfru score is carried to now, not raised
            s.freq[layer, e] = s.decayed((layer, e), now)
            s.last_use[layer, e] = now
        self._unused_prefetch[key] = now
        self.stats.prefetched += 1

    def _give_back(self, key: tuple[int, int]) -> None:
        """Release the pages evictions may have moved to ``key``, a leaf that will not be filled
        now (gate thread)."""
        if self._recycle is not None:
            self._release(*key)

    def drain(self) -> None:
        """Wait until nothing is in flight."""
        if self.native is not None:
            self.native.wait_all()
        self.drain_native()  # prefetches the native pager took leave the flight
        self.fetcher.drain()

    def close(self) -> None:
        self._drop_split()  # before the native pager closes: it would enable it again
        if self.native is not None:
            self.native.close()
        self.drain_native()
        if self.native is not None:
            self.native.free()
        self._down_pending.clear()
        self.state.node_wanted[:] = 0
        for key in self.fetcher.close():
            self._give_back(key)
            self.used -= self._cost[key[0]]
            self._source.pop(key, None)

    # ------------------------------------------------------------------ budget

    def set_budget(self, budget: int) -> None:
        """Change the budget live; shrinking evicts at once (policy order)."""
        self.drain()
        self.budget = budget
        if self.native is not None:
            self.native.budget_changed(budget)
        self.state.protect[:] = 0
        self._make_room(0, 0, [])  # nothing is in use between decodes, nothing protected: always succeeds
