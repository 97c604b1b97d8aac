"""The I/O threads: leaves queued for reading, leaves being read, and reads that failed.

The residency decides what to read and charges the budget; the fetcher only moves bytes, on
threads of its own (as many as leaves read at once: the store's io depth), and tells the
residency when a prefetched leaf has landed. Two queues feed
it: down parts of leaves the gate is serving (part pipelining) come before prefetches.

Prefetches carry a priority (the probability that a gate will use the leaf, as the caller
estimates it): the most likely is read first, the least likely is the first cancelled when a
gate needs room, and while the gate's thread reads a miss of its own, prefetches below
:data:`HOLD_BELOW` wait, so a guess does not slow the read a computation is waiting for.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from . import native

Key = tuple[int, int]

QUEUED, LOADING, DOWN, DOWN_LOADING = 1, 2, 3, 4  # states of a leaf in flight


# the byte of each state in the table (_pager.h: SMOE_FLIGHT_*)
TABLE_QUEUED, TABLE_LOADING, TABLE_TAKEN, TABLE_FAILED, TABLE_OTHER = 1, 2, 3, 4, 5
TABLE_NATIVE = 6  # a native prefetch (the native pager's own, never in this class's flight)
_TABLE = {QUEUED: TABLE_QUEUED, LOADING: TABLE_LOADING, DOWN: TABLE_OTHER, DOWN_LOADING: TABLE_OTHER}


class Flight(dict[Key, int]):
    """Leaves in flight and their states, mirrored (where :attr:`table` is set) into a byte table
    ``[n_layer, n_expert]`` that the native pager reads (``TABLE_*``): it takes a queued
    prefetch (the I/O thread's :meth:`start` then fails), waits on :attr:`signal` for one
    being read, and leaves the others to Python. A leaf leaves the table with a release store,
    after whatever its landing wrote (its resident flag)."""

    def __init__(self) -> None:
        super().__init__()
        self.signal = native.FlightSignal()
        self._table: np.ndarray | None = None
        self._base = self._row = 0  # the table's address and row stride

    @property
    def table(self) -> np.ndarray | None:
        return self._table

    @table.setter
    def table(self, table: np.ndarray) -> None:
        if table.dtype != np.uint8 or not table.flags.c_contiguous or table.ndim != 2:
            raise ValueError("the flight table is a C-contiguous 2-D uint8 array")
        self._table, self._base, self._row = table, table.ctypes.data, table.strides[0]

    def _flag(self, key: Key) -> int:
        return self._base + key[0] * self._row + key[1]

    def _mark(self, key: Key, value: int) -> None:
        if self._table is not None:
            self.signal.store(self._flag(key), value)

    def __setitem__(self, key: Key, state: int) -> None:
        super().__setitem__(key, state)
        self._mark(key, _TABLE[state])

    def __delitem__(self, key: Key) -> None:
        super().__delitem__(key)
        self._mark(key, 0)

    def pop(self, key: Key, *default: int | None) -> int | None:  # type: ignore[override]
        had = key in self
        got = super().pop(key, *default)
        if had:
            self._mark(key, 0)
        return got

    def start(self, key: Key) -> bool:
        """A queued prefetch's read starts (I/O thread); False if the native pager took it."""
        if self._table is not None and not self.signal.start(self._flag(key)):
            return False
        super().__setitem__(key, LOADING)
        return True

    def forget(self, key: Key) -> None:
        """Out of the flight, not the table: a prefetch the native pager took (it has cleared the
        table byte)."""
        super().pop(key, None)

    def drop_marked(self, key: Key) -> None:
        """Leave the flight but stay in the table, failed: a failed read, whose pages and charge
        only the gate thread gives back (:meth:`unmark` then)."""
        super().__delitem__(key)
        self._mark(key, TABLE_FAILED)

    def unmark(self, key: Key) -> None:
        """Out of the table, unless in flight again."""
        if key not in self:
            self._mark(key, 0)


HOLD_BELOW = 0.5  # prefetches less likely than this wait while the gate reads a miss itself


class Fetcher:
    """Reads leaves with ``fill(layer, expert, stage)`` on ``workers`` background threads.

    ``on_landed(key, priority)`` is called (with the fetcher's lock held) when a prefetch is complete;
    a failed read is kept in :attr:`failed` (prefetches) or :attr:`failed_down` (part reads) for the
    gate thread to report or release."""

    def __init__(self, fill: Callable[[int, int, int | None], None],
                 on_landed: Callable[[Key, float], None], workers: int = 1) -> None:
        self._fill = fill
        self._n_workers = max(1, workers)
        self._on_landed = on_landed
        self.flight = Flight()  # guarded by cv
        self.failed: dict[Key, BaseException] = {}
        self.failed_down: dict[Key, BaseException] = {}  # raised by await_down, never reaped
        # One lock, two conditions: the gate thread waits on cv for reads to end; the I/O threads
        # wait on _wake for work, so that a landing does not wake every idle reader for nothing.
        lock = threading.RLock()
        self.cv = threading.Condition(lock)
        self._wake = threading.Condition(lock)
        # prefetches: a heap of (-priority, order, key); a cancelled entry stays until popped
        self._queue: list[tuple[float, int, Key]] = []
        self._queued: dict[Key, tuple[float, int]] = {}  # key -> its live heap entry (priority, order)
        self._order = itertools.count()
        self._down_queue: deque[Key] = deque()  # down parts of leaves being gated (first)
        self._part_stage: dict[Key, int] = {}  # a queued part read's stage where it is not 1 (down)
        self._workers: list[threading.Thread] = []
        self._closing = False
        self._gate_reading = 0  # > 0 while the gate's thread reads a miss (low prefetches wait)

    def __contains__(self, key: Key) -> bool:
        return key in self.flight

    def __len__(self) -> int:
        return len(self.flight)

    def state(self, key: Key) -> int | None:
        return self.flight.get(key)

    def prefetch(self, key: Key, priority: float = 1.0) -> None:
        """Queue a whole leaf; higher ``priority`` is read first."""
        with self.cv:
            self.flight[key] = QUEUED
            entry = (-float(priority), next(self._order))
            self._queued[key] = entry
            heapq.heappush(self._queue, (*entry, key))
            self._wake.notify()  # one reader for one leaf
        self._ensure_worker()

    @property
    def queued(self) -> int:
        """Prefetches not yet being read."""
        return len(self._queued)

    @contextmanager
    def gate_reads(self) -> Iterator[None]:
        """The gate's thread reads a miss itself: prefetches below HOLD_BELOW do not start meanwhile."""
        with self.cv:
            self._gate_reading += 1
        try:
            yield
        finally:
            with self.cv:
                self._gate_reading -= 1
                self._wake.notify_all()  # the prefetches it held

    def down(self, key: Key, stage: int = 1) -> None:
        """Queue a leaf's parts of ``stage``: its down parts (stage 1), or its gate/up parts read
        ahead for the next layer of a prompt taken part by part (stage 0); ahead of every prefetch.
        The other part reads' calls (:meth:`take_down`, :meth:`await_down`, :meth:`forget_down`)
        take either."""
        with self.cv:
            self.flight[key] = DOWN
            if stage != 1:
                self._part_stage[key] = stage
            self._down_queue.append(key)
            self._wake.notify()
        self._ensure_worker()

    def _unqueue(self, key: Key) -> bool:
        """Drop a queued prefetch (cv held): True if it was queued, not yet being read."""
        if self.flight.get(key) != QUEUED:
            return False
        del self.flight[key]
        del self._queued[key]
        return True

    def claim(self, key: Key) -> bool:
        """Take a queued prefetch back (True), else wait until its read is over (False)."""
        with self.cv:
            if self._unqueue(key):
                return True
            while key in self.flight:
                self.cv.wait()
            return False

    def claim_queued(self, key: Key) -> bool:
        """Take a queued prefetch back (True); False if it is being read (or not in flight)."""
        with self.cv:
            return self._unqueue(key)

    def take_down(self, key: Key) -> bool:
        """Take a leaf's queued down parts back (True: the caller reads them); False if they are
        being read or done."""
        with self.cv:
            if key in self._down_queue:
                self._down_queue.remove(key)
                self._part_stage.pop(key, None)
                return True
            return False

    def await_down(self, key: Key) -> BaseException | None:
        """Wait until a leaf's down parts, no longer queued (:meth:`take_down`), are read: the
        read's error or None."""
        with self.cv:
            while key in self.flight:
                self.cv.wait()
            self.flight.unmark(key)
            return self.failed_down.pop(key, None)

    def done(self, key: Key) -> None:
        """The gate thread has finished with a leaf it claimed."""
        with self.cv:
            self.flight.pop(key, None)

    def forget_down(self, key: Key) -> None:
        """Drop a leaf's down parts after a failure in its layer (waits out a read in progress)."""
        with self.cv:
            if key in self._down_queue:
                self._down_queue.remove(key)
                self._part_stage.pop(key, None)
            while self.flight.get(key) == DOWN_LOADING:
                self.cv.wait()
            self.flight.pop(key, None)
            self.failed_down.pop(key, None)
            self.flight.unmark(key)

    def cancel_least(self) -> Key | None:
        """Cancel the least likely queued prefetch (the newest among equals) and return it; if
        none is queued, wait for a read in progress to end and return None."""
        with self.cv:
            if self._queued:
                key = max(self._queued, key=lambda k: self._queued[k])
                self._unqueue(key)
                return key
            if self.flight:
                self.cv.wait()
        return None

    def cancel_below(self, priority: float) -> list[Key]:
        """Cancel every queued prefetch less likely than ``priority`` and return them."""
        with self.cv:
            keys = [k for k, (neg, _order) in self._queued.items() if -neg < priority]
            for key in keys:
                self._unqueue(key)
        return keys

    def forget_taken(self, key: Key) -> None:
        """A queued prefetch that the native pager took and read (gate thread)."""
        with self.cv:
            self._queued.pop(key, None)
            self.flight.forget(key)
            self.cv.notify_all()

    def take_failures(self) -> list[Key]:
        """The leaves whose reads failed since last asked (their errors are dropped)."""
        if not self.failed:
            return []
        with self.cv:
            failed, self.failed = self.failed, {}
            for key in failed:
                self.flight.unmark(key)
        return list(failed)

    def take_failure(self, key: Key) -> BaseException | None:
        with self.cv:
            err = self.failed.pop(key, None)
            if err is not None:
                self.flight.unmark(key)
            return err

    def drain(self) -> None:
        """Wait until nothing is in flight."""
        with self.cv:
            while self.flight:
                self.cv.wait()

    def close(self) -> list[Key]:
        """Stop: drop what is queued (returned, for its charge), wait for reads in progress."""
        dropped: list[Key] = []
        with self.cv:
            self._queue.clear()
            self._queued.clear()
            self._down_queue.clear()
            self._part_stage.clear()
            for key, st in list(self.flight.items()):
                if st in (QUEUED, DOWN):
                    del self.flight[key]
                    dropped.append(key)
            self._closing = True
            self._wake.notify_all()
            while self.flight:
                self.cv.wait()
        for worker in self._workers:
            worker.join()
        self._workers = []
        self._closing = False
        return dropped

    def _next_prefetch(self) -> bool:
        """Whether a prefetch may start now (cv held): drops cancelled heap entries; holds those
        below HOLD_BELOW while the gate reads."""
        q = self._queue
        while q and self._queued.get(q[0][2]) != (q[0][0], q[0][1]):
            heapq.heappop(q)  # cancelled, claimed, or queued again since
        return bool(q) and (not self._gate_reading or -q[0][0] >= HOLD_BELOW)

    def _ensure_worker(self) -> None:
        while len(self._workers) < self._n_workers:
            worker = threading.Thread(target=self._work, name=f"smoe-io-{len(self._workers)}", daemon=True)
            self._workers.append(worker)
            worker.start()

    def _work(self) -> None:
        while True:
            with self.cv:
                while not self._down_queue and not self._next_prefetch() and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                down = bool(self._down_queue)
                priority = 1.0
                stage: int | None = None  # a prefetch: the whole leaf
                if down:
                    key = self._down_queue.popleft()
                    stage = self._part_stage.pop(key, 1)
                    self.flight[key] = DOWN_LOADING
                else:
                    neg, _order, key = heapq.heappop(self._queue)
                    priority = -neg
                    del self._queued[key]
                    if not self.flight.start(key):
                        continue  # the native pager took it (the gate thread settles its books)
            layer, e = key
            err: BaseException | None = None
            try:
                self._fill(layer, e, stage)
            except BaseException as ex:  # noqa: BLE001 - reported to the gate that needs it
                err = ex
            with self.cv:
                if err is not None:  # its charge is released by the gate thread
                    (self.failed_down if down else self.failed)[key] = err
                    self.flight.drop_marked(key)  # the native pager keeps off it until then
                else:
                    if not down:
                        self._on_landed(key, priority)
                    del self.flight[key]  # a leaf's down parts: the residency makes it resident
                self.cv.notify_all()
