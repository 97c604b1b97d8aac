"""Native part readers: many leaf parts read at once, off the GIL, straight into the X-Slot.

A :class:`ReadPool` is a pool of C threads (``_readpool.c``, loaded with ctypes). :meth:`ReadPool.run`
hands it a batch of :class:`Read` s and blocks, without the GIL, until every one is done: the
parts are read in parallel, in place where the destination and the file offset are block-aligned
(through a bounce buffer where not), and hashed by the workers where a digest is given. An
*urgent* batch (a gate waiting for it) is served before every queued background one (prefetch).
The number of workers is the number of reads the disk sees at once (``--io-depth``); the pool
keeps one thread more, which background batches never occupy, so an urgent read starts at once
even while prefetches are read. Background reads also hold at most half a MiB per worker in
flight (:attr:`ReadPool.background_cap`; one may always start, and while no urgent read is
queued or under way as many as :meth:`ReadPool.set_background_entries` allows): a disk serves
the bytes it is asked for at once side by side, so a gate's read shares it with at most that many
prefetch bytes, while small parts still get several readers.
"""

from __future__ import annotations

import ctypes
import os
from ctypes import POINTER, Structure, c_char_p, c_double, c_int32, c_int64, c_size_t, c_uint64, c_void_p
from dataclasses import dataclass

import numpy as np

from .errors import SmoeError
from .native import check_sizeof, load_extension

SHORT = -1  # the file ends before the part does
MISMATCH = -2  # the bytes do not have the expected sha256
DEFAULT_IO_DEPTH = 4  # concurrent reads: the best of 1-16 on the disks measured (docs/bench.md)
MAX_IO_DEPTH = 64


class _Job(Structure):
    """``struct smoe_job`` in _readpool.c (checked against its sizeof at load)."""

    _fields_ = [
        ("fd", c_int32),
        ("direct", c_int32),
        ("offset", c_int64),
        ("length", c_int64),
        ("dest", c_void_p),
        ("sha256", c_char_p),
        ("status", c_int32),
        ("in_place", c_int32),
        ("bytes_read", c_int64),
        ("read_seconds", c_double),
        ("hash_seconds", c_double),
        ("xxh64", c_uint64),
        ("check_xxh64", c_int32),
        ("chain", c_int32),
        ("next", c_void_p),
        ("call", c_void_p),
    ]


@dataclass(frozen=True)
class Read:
    """One part to read: ``length`` bytes of ``fd`` at ``offset`` into memory at ``dest``."""

    fd: int
    direct: bool  # the descriptor was opened with O_DIRECT
    offset: int
    length: int
    dest: int
    sha256: bytes | None = None  # the digest the bytes must have (32 bytes), or None
    xxh64: int | None = None  # the XXH64 they must have (checked instead of sha256), or None


@dataclass(frozen=True)
class Outcome:
    """What became of one :class:`Read`: ``status`` 0, an errno, :data:`SHORT` or :data:`MISMATCH`."""

    status: int
    bytes_read: int
    in_place: bool
    read_seconds: float
    hash_seconds: float

    def error(self) -> str:
        """Why it failed, in words."""
        if self.status == SHORT:
            return "truncated"
        if self.status == MISMATCH:
            return "checksum mismatch"
        return os.strerror(self.status)


_LIB: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        lib = load_extension("_readpool")
        check_sizeof(lib, "job", ctypes.sizeof(_Job), "readpool.py")
        lib.smoe_pool_new.restype = c_void_p
        lib.smoe_pool_new.argtypes = [c_int32, c_int32]
        lib.smoe_pool_run.restype = c_int64
        lib.smoe_pool_run.argtypes = [c_void_p, POINTER(_Job), c_int64, c_int32]
        lib.smoe_pool_free.restype = None
        lib.smoe_pool_free.argtypes = [c_void_p]
        for name in ("smoe_pool_workers", "smoe_pool_threads", "smoe_pool_peak_background"):
            getattr(lib, name).restype = c_int32
            getattr(lib, name).argtypes = [c_void_p]
        lib.smoe_pool_background_cap.restype = c_int64
        lib.smoe_pool_background_cap.argtypes = [c_void_p]
        lib.smoe_pool_set_background_entries.restype = c_int32
        lib.smoe_pool_set_background_entries.argtypes = [c_void_p, c_int32]
        lib.smoe_pool_hold.restype = None
        lib.smoe_pool_hold.argtypes = [c_void_p, c_int32]
        for name in ("smoe_pool_chains", "smoe_pool_caller_jobs", "smoe_pool_idle_wakes"):
            getattr(lib, name).restype = c_int64
            getattr(lib, name).argtypes = [c_void_p]
        lib.smoe_pool_library_sha256.restype = c_int32
        lib.smoe_pool_library_sha256.argtypes = [c_void_p]
        lib.smoe_xxh64.restype = c_uint64
        lib.smoe_xxh64.argtypes = [c_void_p, c_size_t, c_uint64]
        _LIB = lib
    return _LIB


def job_array(n: int) -> ctypes.Array[_Job]:
    """Room for ``n`` jobs (the native pager builds its own in it)."""
    return (_Job * n)()


POOL_FUNCTIONS = ("start", "finish", "cancel", "promote")


def pool_function_addresses() -> dict[str, int]:
    """Addresses of ``smoe_pool_start``, ``_finish``, ``_cancel`` and ``_promote`` (for native
    callers), by those names."""
    lib = _lib()
    return {name: int(ctypes.cast(getattr(lib, f"smoe_pool_{name}"), c_void_p).value or 0) for name in POOL_FUNCTIONS}


def xxh64(data: bytes | bytearray | memoryview) -> int:
    """XXH64 (seed 0) of ``data``: the pack's fast per-part check."""
    arr = np.frombuffer(data, np.uint8)  # no copy, read-only buffers too
    return int(_lib().smoe_xxh64(arr.ctypes.data if arr.size else None, arr.size, 0))


class ReadPool:
    """``workers`` reads at once, on ``workers + 1`` native threads (the spare for urgent reads),
    background ones of at most :attr:`background_cap` bytes together; :meth:`run` may be called from
    any number of threads."""

    def __init__(self, workers: int = DEFAULT_IO_DEPTH) -> None:
        self._pool: int | None = None
        if not 1 <= workers <= MAX_IO_DEPTH:
            raise SmoeError(f"io depth must be 1 to {MAX_IO_DEPTH}, not {workers}")
        self._lib = _lib()
        self._pool = self._lib.smoe_pool_new(workers, 1)
        if not self._pool:
            raise SmoeError("could not start the reader threads")
        self.workers = int(self._lib.smoe_pool_workers(self._pool))
        self.background_cap = int(self._lib.smoe_pool_background_cap(self._pool))  # bytes: half a MiB a worker
        self.threads = int(self._lib.smoe_pool_threads(self._pool))
        self.library_sha256 = bool(self._lib.smoe_pool_library_sha256(self._pool))

    def run(self, reads: list[Read], urgent: bool) -> list[Outcome]:
        """Read every part of ``reads`` (urgent: ahead of queued background batches); their outcomes."""
        if not reads:
            return []
        jobs = (_Job * len(reads))()
        for j, r in zip(jobs, reads, strict=True):
            j.fd, j.direct, j.offset, j.length, j.dest = r.fd, int(r.direct), r.offset, r.length, r.dest
            j.sha256 = r.sha256
            if r.xxh64 is not None:
                j.xxh64, j.check_xxh64 = r.xxh64, 1
        self._lib.smoe_pool_run(self.address, jobs, len(reads), 1 if urgent else 0)
        return [Outcome(j.status, j.bytes_read, bool(j.in_place), j.read_seconds, j.hash_seconds) for j in jobs]

    @property
    def peak_background(self) -> int:
        """The most background reads that ran at once so far (never more than :attr:`workers`)."""
        return int(self._lib.smoe_pool_peak_background(self.address))

    @property
    def chains(self) -> int:
        """Runs of reads that followed each other on disk (a leaf's parts) and were read with one
        ``preadv`` each, so far."""
        return int(self._lib.smoe_pool_chains(self.address))

    @property
    def caller_jobs(self) -> int:
        """Urgent reads that the thread waiting for them read itself (no worker had taken them
        yet), so far."""
        return int(self._lib.smoe_pool_caller_jobs(self.address))

    @property
    def idle_wakes(self) -> int:
        """Times a worker woke and found nothing it could start, so far."""
        return int(self._lib.smoe_pool_idle_wakes(self.address))

    def set_background_entries(self, n: int) -> int:
        """Let up to ``n`` background reads (whole entries: a leaf's parts) start whatever
        :attr:`background_cap` says while no urgent read is queued or under way, at most
        :attr:`workers` (1, the default: one always may); returns the number set."""
        return int(self._lib.smoe_pool_set_background_entries(self.address, n))

    def hold(self, held: bool, urgent: bool = False) -> None:
        """Keep background reads queued (True) or let them start (False); urgent ones run either
        way, read by the workers or, with ``urgent`` held too, only by the thread that waits for
        them."""
        self._lib.smoe_pool_hold(self.address, (2 if urgent else 1) if held else 0)

    @property
    def address(self) -> int:
        """The native pool (for native callers of ``smoe_pool_start``, and every call here); a
        closed pool raises."""
        if self._pool is None:
            raise SmoeError("the read pool is closed")
        return self._pool

    def close(self) -> None:
        """Stop the threads (no :meth:`run` may be in progress)."""
        if self._pool:
            self._lib.smoe_pool_free(self._pool)
            self._pool = None

    def __del__(self) -> None:
        self.close()
