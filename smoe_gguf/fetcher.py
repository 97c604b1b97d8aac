"""The I/O thread: leaves queued for reading, leaves being read, and reads that failed.

The residency decides what to read and charges the budget; the fetcher only moves bytes, on a
thread of its own, and tells the residency when a prefetched leaf has landed. Two queues feed
it: down parts of leaves the gate is serving (part pipelining) come before prefetches.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

Key = tuple[int, int]

QUEUED, LOADING, DOWN, DOWN_LOADING = 1, 2, 3, 4  # states of a leaf in flight


class Fetcher:
    """Reads leaves with ``fill(layer, expert, stage)`` on a background thread.

    ``on_landed(key)`` is called (with the fetcher's lock held) when a prefetch is complete;
    a failed read is kept in :attr:`failed` for the gate thread to report or release."""

    def __init__(self, fill: Callable[[int, int, int | None], None], on_landed: Callable[[Key], None]) -> None:
        self._fill = fill
        self._on_landed = on_landed
        self.flight: dict[Key, int] = {}  # guarded by cv
        self.failed: dict[Key, BaseException] = {}
        self.cv = threading.Condition()
        self._queue: deque[Key] = deque()  # prefetches
        self._down_queue: deque[Key] = deque()  # down parts of leaves being gated (first)
        self._worker: threading.Thread | None = None
        self._closing = False

    def __contains__(self, key: Key) -> bool:
        return key in self.flight

    def __len__(self) -> int:
        return len(self.flight)

    def state(self, key: Key) -> int | None:
        return self.flight.get(key)

    def prefetch(self, key: Key) -> None:
        """Queue a whole leaf."""
        with self.cv:
            self.flight[key] = QUEUED
            self._queue.append(key)
            self.cv.notify_all()
        self._ensure_worker()

    def down(self, key: Key) -> None:
        """Queue a leaf's down parts (stage 1), ahead of every prefetch."""
        with self.cv:
            self.flight[key] = DOWN
            self._down_queue.append(key)
            self.cv.notify_all()
        self._ensure_worker()

    def claim(self, key: Key) -> bool:
        """Take a queued prefetch back (True), else wait until its read is over (False)."""
        with self.cv:
            if self.flight.get(key) == QUEUED:
                del self.flight[key]
                self._queue.remove(key)
                return True
            while key in self.flight:
                self.cv.wait()
            return False

    def claim_down(self, key: Key) -> tuple[bool, BaseException | None]:
        """For a leaf whose down parts were queued: (True, None) if they were still queued (the
        caller reads them), else wait for the read and return (False, its error or None)."""
        with self.cv:
            if key in self._down_queue:
                self._down_queue.remove(key)
                return True, None
            while key in self.flight:
                self.cv.wait()
            return False, self.failed.pop(key, None)

    def done(self, key: Key) -> None:
        """The gate thread has finished with a leaf it claimed."""
        with self.cv:
            self.flight.pop(key, None)

    def forget_down(self, key: Key) -> None:
        """Drop a leaf's down parts after a failure in its layer (waits out a read in progress)."""
        with self.cv:
            if key in self._down_queue:
                self._down_queue.remove(key)
            while self.flight.get(key) == DOWN_LOADING:
                self.cv.wait()
            self.flight.pop(key, None)
            self.failed.pop(key, None)

    def cancel_newest(self) -> Key | None:
        """Cancel the newest queued prefetch and return it; if none is queued, wait for a read
        in progress to end and return None."""
        with self.cv:
            if self._queue:
                key = self._queue.pop()
                del self.flight[key]
                return key
            if self.flight:
                self.cv.wait()
        return None

    def take_failures(self) -> list[Key]:
        """The leaves whose reads failed since last asked (their errors are dropped)."""
        if not self.failed:
            return []
        with self.cv:
            failed, self.failed = self.failed, {}
        return list(failed)

    def take_failure(self, key: Key) -> BaseException | None:
        with self.cv:
            return self.failed.pop(key, None)

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
            self._down_queue.clear()
            for key, st in list(self.flight.items()):
                if st in (QUEUED, DOWN):
                    del self.flight[key]
                    dropped.append(key)
            self._closing = True
            self.cv.notify_all()
            while self.flight:
                self.cv.wait()
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        return dropped

    def _ensure_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="smoe-io", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self.cv:
                while not self._queue and not self._down_queue and not self._closing:
                    self.cv.wait()
                if self._closing:
                    return
                down = bool(self._down_queue)
                key = self._down_queue.popleft() if down else self._queue.popleft()
                self.flight[key] = DOWN_LOADING if down else LOADING
            layer, e = key
            err: BaseException | None = None
            try:
                self._fill(layer, e, 1 if down else None)
            except BaseException as ex:  # noqa: BLE001 - reported to the gate that needs it
                err = ex
            with self.cv:
                if err is not None:  # its charge is released by the gate thread
                    self.failed[key] = err
                elif not down:
                    self._on_landed(key)
                del self.flight[key]  # a leaf's down parts: the residency makes it resident
                self.cv.notify_all()
