"""The native pager (``_pager.c``): a gate's misses served in C, over the residency's own tables.

:class:`NativePager` fills a ``struct smoe_pager`` with pointers to the arrays the residency, the
policies and the fetcher already keep (resident, last use, use counts, the clock, pinned and
predicted leaves, leaves in flight, the budget ledger), with where each leaf part lives (its
shard's descriptor and offset, its XXH64, its slice in the X-Slot and the X-Slot's flags) and with
the reader pool. The gate (:meth:`~smoe_gguf.gate.Gate.attach_pager`) then serves a miss without
entering Python, a miss that a prefetch has queued (taken from the I/O threads) or is reading
(waited for) included; what the pager cannot do (a shard not opened yet, a prefetch that failed,
no room without cancelling prefetches, a failed read) it leaves to the Python residency, which
remains the reference implementation.

It also reads prefetches itself (:meth:`NativePager.prefetch`, which speculation in C calls at
a gate): on the reader pool's background queue, landing on a reader thread, cancelled or moved
ahead by the gates that need their room or their leaf.

Python reads what the pager did with :meth:`NativePager.take_counts` (counters since the last
call), :meth:`NativePager.take_evictions` (leaves it evicted, with their last use at eviction),
:meth:`NativePager.take_flights` (prefetches it took or waited for) and
:meth:`NativePager.take_landings` (its own prefetches landed, failed or cancelled), on the thread
that calls llama_decode, between gates.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import resource
import threading
from collections.abc import Sequence
from ctypes import POINTER, Structure, c_double, c_int32, c_int64, c_uint8, c_uint32, c_uint64, c_void_p
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from . import native
from .errors import SmoeError
from .policy import AccessState, Policy
from .readpool import job_array
from .store import LeafStore, StoreStats
from .xslot import _MADV_NOHUGEPAGE, MAX_MOVED_SLICES, XSlot


class Books(Protocol):
    """What the pager reads of the residency (residency.py): its tables and its rules."""

    state: AccessState
    ledger: np.ndarray  # int64 [2]: charged bytes, budget
    evicted_at: np.ndarray  # uint64 [n_layer, n_expert]
    regret_window: int
    policy: Policy

    @property
    def costs(self) -> dict[int, int]: ...

    @property
    def budget(self) -> int: ...

POLICY_CODES = {"lru": 0, "lfru": 1, "least-stale": 2}
LOG_PAIRS = 4096  # evictions the pager can log between two drains
FLIGHT_LOG = 4096  # prefetches taken or waited for that it can log between two drains
TAKEN, LATE = 0, 1  # the flight log's events (_pager.h: SMOE_EVENT_*)
LANDED, LANDED_FAILED, LANDED_CANCELLED = 0, 1, 2  # the landings' (_pager.h: SMOE_LANDED*)
NATIVE_SOURCE = "speculation"  # who asks for the native prefetches: speculation in C (spec_native)
# the pager's counters Python takes and zeroes (struct smoe_pager also has "peak", never zeroed)
COUNTERS = ("gates", "hits", "misses", "loaded", "evictions", "regrets", "moved_bytes", "fallbacks",
            "stall_ns", "part_reads", "in_place_reads", "bytes_read", "checked_parts", "batches")


class _PfCounts(Structure):
    """``struct smoe_pf_counts`` in _pager.h."""

    _fields_ = [*((name, c_uint64) for name in ("part_reads", "in_place_reads", "bytes_read", "checked_parts",
                                                 "landed", "failed")),
                ("read_seconds", c_double), ("hash_seconds", c_double)]


class _PagerStruct(Structure):
    """``struct smoe_pager`` in _pager.h (checked against its sizeof at load)."""

    _fields_ = [
        ("enabled", c_int32),
        ("policy", c_int32),
        ("half_life", c_double),
        ("token_weight", c_double),
        ("n_layer", c_int32),
        ("n_expert", c_int32),
        ("n_parts", c_int32),
        ("can_move", c_int32),
        ("check_always", c_int32),
        ("thp_advise", c_int32),
        ("merge_emptied", c_int32),
        ("page", c_int64),
        ("ledger", POINTER(c_int64)),
        ("cost", POINTER(c_int64)),
        ("resident", POINTER(c_uint8)),
        ("pinned", POINTER(c_uint8)),
        ("protect", POINTER(c_uint8)),
        ("in_flight", POINTER(c_uint8)),
        ("last_use", POINTER(c_uint64)),
        ("uses", POINTER(c_uint32)),
        ("freq", POINTER(c_double)),
        ("clock", POINTER(c_uint64)),
        ("scan", POINTER(c_uint8)),
        ("evicted_at", POINTER(c_uint64)),
        ("regret_window", c_uint64),
        ("fd", POINTER(c_int32)),
        ("direct", POINTER(c_uint8)),
        ("layer_parts", POINTER(c_int32)),
        ("t_addr", POINTER(c_int64)),
        ("t_slice", POINTER(c_int64)),
        ("t_nexp", POINTER(c_int64)),
        ("t_flags", POINTER(c_int64)),
        ("offset", POINTER(c_int64)),
        ("xxh64", POINTER(c_uint64)),
        ("check", POINTER(c_uint8)),
        ("pool", c_void_p),
        ("start", c_void_p),
        ("finish", c_void_p),
        ("lock", c_void_p),
        ("log", POINTER(c_int64)),
        ("log_cap", c_int64),
        ("log_n", c_int64),
        ("jobs", c_void_p),
        ("jobs_cap", c_int64),
        ("scratch", POINTER(c_int32)),
        ("mark", POINTER(c_uint8)),
        *((name, c_uint64) for name in (*COUNTERS[:8], "peak", *COUNTERS[8:])),
        ("read_seconds", c_double),
        ("hash_seconds", c_double),
        ("layer_misses", POINTER(c_uint64)),
        ("layer_stall_ns", POINTER(c_uint64)),
        ("flight", c_void_p),
        ("flight_log", POINTER(c_int64)),
        ("flight_log_cap", c_int64),
        ("flight_log_n", c_int64),
        ("serve_flights", c_int32),
        ("cancel", c_void_p),
        ("promote", c_void_p),
        ("pf", c_void_p),
        ("pf_jobs", c_void_p),
        ("pf_also", c_void_p),
        ("pf_flying", c_int64),
        ("landings", c_void_p),
        ("landings_cap", c_int64),
        ("landings_n", c_int64),
        ("landings_owed", c_int64),
        ("pf_queued", c_uint64),
        ("pf_counts", _PfCounts),
    ]


@dataclass
class Counts:
    """What the pager did since the last :meth:`NativePager.take_counts`."""

    gates: int = 0  # gates with a miss it served
    hits: int = 0  # ... their leaves that were resident
    misses: int = 0
    loaded: int = 0
    evictions: int = 0
    regrets: int = 0
    moved_bytes: int = 0  # pages handed from victims to misses
    fallbacks: int = 0  # gates with a miss it left to Python
    stall_ns: int = 0
    part_reads: int = 0
    in_place_reads: int = 0
    bytes_read: int = 0
    checked_parts: int = 0
    batches: int = 0
    read_seconds: float = 0.0
    hash_seconds: float = 0.0
    peak: int = 0  # most bytes charged at once (not reset)
    layer_misses: dict[int, int] | None = None
    layer_stall_ns: dict[int, int] | None = None


def _ptr(arr: np.ndarray, ctype: type) -> object:
    if not arr.flags.c_contiguous:
        raise SmoeError("native pager tables must be contiguous")
    return arr.ctypes.data_as(POINTER(ctype))


class NativePager:
    """A ``struct smoe_pager`` over ``residency``'s tables, ``xslot``'s slices and ``store``'s
    parts. It serves while :attr:`enabled` (the residency switches it off for what only Python
    does: tracing, part pipelining, the negative control)."""

    def __init__(self, residency: Books, xslot: XSlot, store: LeafStore, in_flight: np.ndarray,
                 flight_signal: native.FlightSignal) -> None:
        native.check_sizeof(native.lib(), "pager", ctypes.sizeof(_PagerStruct), "pager.py")
        r, s = residency, residency.state
        L, E = s.n_layer, s.n_expert
        if L * E >= 2**31:
            raise SmoeError("too many leaves for the native pager")
        costs = r.costs
        P = max(len(store.parts(layer, 0)) for layer in costs)
        self.n_layer, self.n_expert, self.n_parts = L, E, P
        self._store = store
        self._keep: list[object] = []  # everything C points to
        st = _PagerStruct()
        st.policy = POLICY_CODES[r.policy.name]
        st.half_life = s.half_life
        st.token_weight = s.token_weight
        st.n_layer, st.n_expert, st.n_parts = L, E, P
        st.check_always = 1 if store.checksums == "always" else 0
        st.thp_advise = 1 if _MADV_NOHUGEPAGE is not None else 0  # as the X-Slot does for its own mappings
        st.page = mmap.PAGESIZE
        self.cost = np.zeros(L, np.int64)
        for layer, c in costs.items():
            self.cost[layer] = c
        self.layer_parts = np.zeros(L, np.int32)
        self.t_addr = np.zeros(L * P, np.int64)
        self.t_slice = np.zeros(L * P, np.int64)
        self.t_nexp = np.zeros(L * P, np.int64)
        self.t_flags = np.zeros(L * P, np.int64)
        self.offset = np.zeros(L * E * P, np.int64)
        self.xxh64 = np.zeros(L * E * P, np.uint64)
        self.check = np.zeros(L * E * P, np.uint8)
        self.fd = np.full(L * E, -1, np.int32)
        self.direct = np.zeros(L * E, np.uint8)
        usable = True  # False: a part the pager cannot check (sha256 only) or place
        for layer in costs:
            parts = store.parts(layer, 0)
            self.layer_parts[layer] = len(parts)
            for i, p in enumerate(parts):
                reg = xslot.regions[p.tensor]
                k = layer * P + i
                self.t_addr[k], self.t_slice[k], self.t_nexp[k] = reg.address, reg.slice_bytes, reg.n_expert
                self.t_flags[k] = xslot.flags_address(p.tensor)
            for e in range(E):
                for i, p in enumerate(store.parts(layer, e)):
                    pid = (layer * E + e) * P + i
                    self.offset[pid] = p.offset
                    if p.sha256 is not None and store.checksums != "never":
                        if p.xxh64 is None:
                            usable = False
                        else:
                            self.xxh64[pid], self.check[pid] = p.xxh64, 1
                    if p.length != xslot.regions[p.tensor].slice_bytes:
                        usable = False
        self.usable = usable and not xslot.file_mapped
        self._min_cost = max(1, min(costs.values()))
        st.can_move = 1 if xslot.can_move and self._moves_bounded(r.budget) else 0
        st.merge_emptied = 0 if self._all_slices_bounded() else 1
        self.ledger = r.ledger
        self._log = np.zeros(2 * LOG_PAIRS, np.int64)
        self._jobs_cap = E * P
        self._jobs = job_array(self._jobs_cap)
        self._scratch = np.zeros(5 * E, np.int32)
        self._flight_log = np.zeros(3 * FLIGHT_LOG, np.int64)
        self._mark = np.zeros(L * E, np.uint8)
        self.layer_misses = np.zeros(L, np.uint64)
        self.layer_stall_ns = np.zeros(L, np.uint64)
        st.ledger = _ptr(self.ledger, c_int64)
        st.cost = _ptr(self.cost, c_int64)
        st.resident, st.pinned, st.protect = (_ptr(a, c_uint8) for a in (s.resident, s.pinned, s.protect))
        st.in_flight = _ptr(in_flight, c_uint8)
        st.last_use, st.uses, st.clock = _ptr(s.last_use, c_uint64), _ptr(s.uses, c_uint32), _ptr(s.clock, c_uint64)
        st.scan = _ptr(s.scan, c_uint8)
        st.freq = _ptr(s.freq, c_double)
        st.evicted_at = _ptr(r.evicted_at, c_uint64)
        st.regret_window = r.regret_window
        st.fd, st.direct = _ptr(self.fd, c_int32), _ptr(self.direct, c_uint8)
        st.layer_parts = _ptr(self.layer_parts, c_int32)
        st.t_addr, st.t_slice = _ptr(self.t_addr, c_int64), _ptr(self.t_slice, c_int64)
        st.t_nexp, st.t_flags = _ptr(self.t_nexp, c_int64), _ptr(self.t_flags, c_int64)
        st.offset, st.xxh64, st.check = _ptr(self.offset, c_int64), _ptr(self.xxh64, c_uint64), _ptr(self.check, c_uint8)
        st.pool, fns = store.native_readers()
        st.start, st.finish = fns["start"], fns["finish"]
        st.lock = xslot.lock.address
        st.log, st.log_cap = _ptr(self._log, c_int64), LOG_PAIRS
        st.jobs, st.jobs_cap = ctypes.addressof(self._jobs), self._jobs_cap
        st.scratch, st.mark = _ptr(self._scratch, c_int32), _ptr(self._mark, c_uint8)
        st.layer_misses, st.layer_stall_ns = _ptr(self.layer_misses, c_uint64), _ptr(self.layer_stall_ns, c_uint64)
        st.flight = flight_signal.address
        st.serve_flights = 1
        st.flight_log, st.flight_log_cap = _ptr(self._flight_log, c_int64), FLIGHT_LOG
        self._st = st
        self._keep += [xslot, store, in_flight, s, flight_signal]
        lib = native.lib()
        self._lib = lib
        lib.smoe_pager_prefetch_init.restype = c_int32
        lib.smoe_pager_prefetch_init.argtypes = [c_void_p, c_void_p, c_void_p]
        lib.smoe_pager_take_landings.restype = c_int64
        lib.smoe_pager_take_landings.argtypes = [c_void_p, c_void_p, c_int64, c_void_p]
        lib.smoe_pager_prefetch.restype = c_int32
        lib.smoe_pager_prefetch.argtypes = [c_void_p, c_int32, c_void_p, c_int32, c_void_p, c_void_p, c_void_p, c_int32]
        lib.smoe_pager_await_leaf.restype = c_uint8
        lib.smoe_pager_await_leaf.argtypes = [c_void_p, c_int64]
        lib.smoe_pager_cancel_or_wait.restype = c_int32
        lib.smoe_pager_cancel_or_wait.argtypes = [c_void_p]
        for name in ("smoe_pager_wait_all", "smoe_pager_prefetch_free"):
            getattr(lib, name).restype = None
            getattr(lib, name).argtypes = [c_void_p]
        if lib.smoe_pager_prefetch_init(ctypes.addressof(st), fns["cancel"], fns["promote"]) != 0:
            raise MemoryError("native prefetch records")
        self._landings = np.zeros(3 * L * E, np.int64)
        self._make_room = lib.smoe_pager_make_room
        self._make_room.restype = c_int32
        self._make_room.argtypes = [c_void_p, c_int32, POINTER(c_int32), c_int32, POINTER(c_int64), c_int32, c_int64,
                                    c_int32, c_int32]
        self.address = ctypes.addressof(st)
        self._opener: threading.Thread | None = None
        self._stop = threading.Event()

    def _moves_bounded(self, budget: int) -> bool:
        """Whether the slices that can hold moved pages under ``budget`` (each is a mapping of its
        own) surely stay below the X-Slot's bound."""
        return (budget // self._min_cost + 1) * self.n_parts <= MAX_MOVED_SLICES

    def _all_slices_bounded(self) -> bool:
        """Whether every paged slice being a mapping of its own stays below the X-Slot's bound: a
        slice emptied by a move may then stay one (no fresh mapping to merge it back with its
        neighbours, a third of a move's calls)."""
        return int((self.cost > 0).sum()) * self.n_expert * self.n_parts <= MAX_MOVED_SLICES

    def budget_changed(self, budget: int) -> None:
        """A new budget: pages stop moving where it could hold too many moved slices (they never
        start again: the kernel may have refused a move)."""
        if not self._moves_bounded(budget):
            self._st.can_move = 0

    @property
    def enabled(self) -> bool:
        return bool(self._st.enabled)

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self._st.enabled = 1 if on and self.usable else 0

    @property
    def serve_flights(self) -> bool:
        """Whether a miss that a prefetch has in flight is served here (else its gate goes to
        Python: the control of the comparisons between the two)."""
        return bool(self._st.serve_flights)

    @serve_flights.setter
    def serve_flights(self, on: bool) -> None:
        self._st.serve_flights = 1 if on else 0

    def open_shards(self) -> None:
        """Open every leaf's shard in a background thread, so that misses need not wait for
        Python to open one (a shard that cannot be opened stays to Python, which names it)."""
        if self._opener is not None:
            return
        leaves = sorted(k for k in self._store.leaves if k[0] < self.n_layer and self.cost[k[0]] > 0)
        limit = _fd_room()

        def run() -> None:
            for n, (layer, e) in enumerate(leaves):
                if self._stop.is_set() or n >= limit:
                    return
                self.note_open(layer, e)

        self._opener = threading.Thread(target=run, name="smoe-open-shards", daemon=True)
        self._opener.start()

    def make_room(self, need: int, layer: int, in_use: list[int], also: Sequence[tuple[int, int]],
                  into: tuple[int, int] | None) -> bool:
        """Evict (policy order) until ``need`` more bytes fit, never one of ``in_use`` at ``layer``,
        one of ``also``, a pinned, predicted or in-flight leaf; the first victim's pages go to leaf
        ``into`` where they can (it is then claimed: fill it or release it). False, with nothing
        changed, if not enough can go. On the thread that calls llama_decode, outside a gate's
        native service."""
        ids = np.asarray(in_use, np.int32)
        keys = np.asarray([layer_ * self.n_expert + e for layer_, e in also], np.int64)
        to = into if into is not None else (-1, 0)
        return bool(self._make_room(self.address, layer, ids.ctypes.data_as(POINTER(c_int32)), ids.size,
                                    keys.ctypes.data_as(POINTER(c_int64)), keys.size, need, *to))

    def wait_opened(self) -> None:
        """Wait until :meth:`open_shards` has opened every shard it could."""
        if self._opener is not None:
            self._opener.join()

    def note_open(self, layer: int, e: int) -> None:
        """Give the pager leaf (layer, e)'s shard descriptor, opening it if needed (any thread)."""
        got = self._store.leaf_fd(layer, e)
        if got is not None:
            fd, direct = got
            k = layer * self.n_expert + e
            self.direct[k] = 1 if direct else 0
            self.fd[k] = fd

    def take_counts(self) -> Counts:
        """The counters since the last call (gate thread, between gates); its reads are added to
        the store's own figures."""
        st = self._st
        c = Counts(**{name: int(getattr(st, name)) for name in COUNTERS},
                   read_seconds=float(st.read_seconds), hash_seconds=float(st.hash_seconds), peak=int(st.peak))
        for name in COUNTERS:
            setattr(st, name, 0)
        st.read_seconds = st.hash_seconds = 0.0
        nz = np.flatnonzero(self.layer_misses)
        c.layer_misses = {int(i): int(self.layer_misses[i]) for i in nz}
        c.layer_stall_ns = {int(i): int(self.layer_stall_ns[i]) for i in nz}
        self.layer_misses[:] = 0
        self.layer_stall_ns[:] = 0
        self._store.count_native(StoreStats(
            bytes_read=c.bytes_read, part_reads=c.part_reads, in_place_reads=c.in_place_reads,
            read_seconds=c.read_seconds, hash_seconds=c.hash_seconds, checked_parts=c.checked_parts,
            batches=c.batches))
        return c

    def take_evictions(self) -> list[tuple[tuple[int, int], int]]:
        """Leaves the pager evicted since the last call, with their last use then (gate thread)."""
        n = int(self._st.log_n)
        if not n:
            return []
        pairs = self._log[: 2 * n].reshape(n, 2).tolist()
        self._st.log_n = 0
        return [(divmod(k, self.n_expert), last) for k, last in pairs]

    def take_landings(self) -> tuple[list[tuple[tuple[int, int], int, int]], int]:
        """The native prefetches (:meth:`prefetch`, and the C speculation's) since the last call
        (gate thread): (leaf, LANDED / LANDED_FAILED / LANDED_CANCELLED, clock at landing) in
        order, and how many the C speculation queued. A failed one's pages and charge are back; its
        reads are added to the store's figures."""
        st = self._st
        c = _PfCounts()
        n = int(self._lib.smoe_pager_take_landings(self.address, self._landings.ctypes.data, self._landings.size // 3,
                                                    ctypes.byref(c)))
        rows = self._landings[: 3 * n].reshape(n, 3).tolist() if n else []
        queued = int(st.pf_queued)
        st.pf_queued = 0
        if c.part_reads:
            self._store.count_native(StoreStats(
                bytes_read=c.bytes_read, part_reads=c.part_reads, in_place_reads=c.in_place_reads,
                read_seconds=c.read_seconds, hash_seconds=c.hash_seconds, checked_parts=c.checked_parts, batches=0))
        return [(divmod(k, self.n_expert), what, clock) for k, what, clock in rows], queued

    def prefetch(self, keys: Sequence[tuple[int, int]], priorities: Sequence[float], layer: int,
                 in_use: Sequence[int]) -> int:
        """Queue leaves for the reader pool in C, as speculation in C does at a gate of ``layer``
        that reads ``in_use`` (``smoe_pager_prefetch``): each charged now, its room made as
        :meth:`make_room` does; stops at the first that does not fit. How many were queued."""
        ls = np.asarray([k[0] for k in keys], np.int32)
        es = np.asarray([k[1] for k in keys], np.int32)
        ps = np.asarray(priorities, np.float64)
        ids = np.asarray(in_use, np.int32)
        return int(self._lib.smoe_pager_prefetch(self.address, layer, ids.ctypes.data, ids.size, ls.ctypes.data,
                                                 es.ctypes.data, ps.ctypes.data, len(keys)))

    def has_shard(self, key: tuple[int, int]) -> bool:
        """Whether leaf ``key``'s shard is open here (:meth:`prefetch` skips a leaf whose is not)."""
        return bool(self.fd[key[0] * self.n_expert + key[1]] >= 0)

    def await_leaf(self, key: tuple[int, int]) -> None:
        """If leaf ``key`` is a native prefetch in flight: read it ahead of the queue and wait for it
        (it lands, or fails: :meth:`take_landings` reaps it)."""
        self._lib.smoe_pager_await_leaf(self.address, key[0] * self.n_expert + key[1])

    @property
    def flying(self) -> bool:
        """Whether native prefetches are queued or being read."""
        return bool(self._st.pf_flying)

    def wait_all(self) -> None:
        """Wait until no native prefetch is in flight (GIL released)."""
        if self._st.pf_flying:
            self._lib.smoe_pager_wait_all(self.address)

    def cancel_or_wait(self) -> bool:
        """Cancel the least likely native prefetch not yet being read, else wait for one to land:
        False if none is in flight (gate thread)."""
        return bool(self._lib.smoe_pager_cancel_or_wait(self.address))

    def take_flights(self) -> list[tuple[tuple[int, int], int, int]]:
        """Prefetches the pager took from the I/O threads (TAKEN) or waited for (LATE) since the
        last call, in order, with the nanoseconds waited (gate thread)."""
        n = int(self._st.flight_log_n)
        if not n:
            return []
        rows = self._flight_log[: 3 * n].reshape(n, 3).tolist()
        self._st.flight_log_n = 0
        return [(divmod(k, self.n_expert), event, ns) for k, event, ns in rows]

    @property
    def pending(self) -> bool:
        """Whether there are counts, evictions or flights not yet taken."""
        st = self._st
        return bool(st.log_n or st.flight_log_n or st.gates or st.fallbacks or st.landings_n or st.pf_queued)

    def close(self) -> None:
        """Stop opening shards (the store closes them) and prefetching; wait for the prefetches in
        flight and free their records (:meth:`take_landings` first, for their books)."""
        self._stop.set()
        if self._opener is not None:
            self._opener.join()
        self._st.enabled = 0
        self.wait_all()

    def free(self) -> None:
        """Free the native prefetches' records (after :meth:`close` and the last :meth:`take_landings`)."""
        self._lib.smoe_pager_prefetch_free(self.address)


def _fd_room() -> int:
    """How many more descriptors the process may open, leaving room for everything else."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > soft):
        want = min(hard if hard != resource.RLIM_INFINITY else soft * 16, 1 << 20)
        try:  # raise the soft limit towards the hard one (macOS may refuse: keep it)
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    used = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64
    return max(0, int(soft) - used - 256)
