"""Disk read bandwidth as the best pager would get it: random reads of a model's own parts.

:func:`part_spans` lists where every leaf part of a pack (or a plain GGUF) lies on disk, as the
block-aligned span the store reads; :func:`leaf_spans` merges each leaf's parts that follow one
another in a file (a pack's leaf shard) into one span, the whole leaf. :func:`random_read_curve`
reads a random selection of spans, cold (the page cache of the files dropped first), with
O_DIRECT (page cache bypassed) into page-aligned buffers, by 1, 2, 4, ... threads at once, and
returns the bytes per second at each concurrency. :func:`device_counters` reads the kernel's
counters of the block device that holds a file: how long it had a request in flight, and how
many bytes it read (Linux only).
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smoe_gguf.gguf_layout import read_layout
from smoe_gguf.moe import analyze
from smoe_gguf.pack import manifest as mf
from smoe_gguf.store import BLOCK, LeafStore, drop_page_cache

READERS: tuple[int, ...] = (1, 2, 4, 8, 16)
NEAR_BEST = 0.9  # a concurrency this close to the best bandwidth is as good, within the curve's noise
MIN_PAGER_READERS = 4  # a gate's several misses (three or four at 10%) at once, beside a prefetch
SWEEPS = 2  # each concurrency read twice: in order, then in reverse


@dataclass(frozen=True)
class Span:
    path: Path
    offset: int  # block-aligned
    length: int  # block multiple
    layer: int
    expert: int


@dataclass(frozen=True)
class DeviceCounters:
    """A block device's cumulative counters (``/sys/dev/block/MAJ:MIN/stat``)."""

    busy_seconds: float  # time with at least one request in flight (io_ticks)
    read_bytes: int  # sectors read x 512

    def __add__(self, other: "DeviceCounters") -> "DeviceCounters":
        return DeviceCounters(self.busy_seconds + other.busy_seconds, self.read_bytes + other.read_bytes)

    def __sub__(self, other: "DeviceCounters") -> "DeviceCounters":
        return DeviceCounters(self.busy_seconds - other.busy_seconds, self.read_bytes - other.read_bytes)


SECTOR = 512  # the unit of the kernel's sector counts, whatever the device's own sector size


def parse_block_stat(text: str) -> DeviceCounters | None:
    """The counters in a block device's ``stat`` file (fields: read I/Os, read merges, sectors
    read, read ticks, write I/Os, write merges, sectors written, write ticks, in flight,
    io_ticks in ms, ...); None where it has fewer fields."""
    f = text.split()
    if len(f) < 10 or not all(x.isdigit() for x in f[:10]):
        return None
    return DeviceCounters(int(f[9]) / 1e3, int(f[2]) * SECTOR)


def device_counters(path: str | os.PathLike[str]) -> DeviceCounters | None:
    """The counters of the block device holding ``path`` (a partition's own where it is one);
    None off Linux, or where the file is on no block device (tmpfs, overlay)."""
    try:
        dev = os.stat(path).st_dev
        text = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat").read_text()
    except OSError:
        return None
    return parse_block_stat(text)


def part_spans(model: str | os.PathLike[str]) -> list[Span]:
    """Every leaf part of a pack directory or a plain MoE GGUF, as the aligned span a read takes."""
    p = Path(model)
    store = LeafStore.from_pack(p, mf.load(p)) if p.is_dir() else LeafStore.from_gguf(analyze(read_layout(p)).require_moe())
    out = []
    for (layer, e), parts in sorted(store.leaves.items()):
        for loc in parts:
            start = loc.offset - loc.offset % BLOCK
            length = -(-(loc.offset + loc.length - start) // BLOCK) * BLOCK
            out.append(Span(loc.path, start, length, layer, e))
    return out


def leaf_spans(spans: Sequence[Span]) -> list[Span]:
    """``spans`` with the parts of each leaf merged where each begins where the one before it ends
    in the same file (a pack's leaf shard: the whole leaf in one read); parts apart (a plain
    GGUF's lie in different tensors) stay apart."""
    out: list[Span] = []
    for s in sorted(spans, key=lambda s: (s.layer, s.expert, str(s.path), s.offset)):
        last = out[-1] if out else None
        if last is not None and (last.layer, last.expert, last.path) == (s.layer, s.expert, s.path) \
                and last.offset + last.length == s.offset:
            out[-1] = Span(s.path, last.offset, last.length + s.length, s.layer, s.expert)
        else:
            out.append(s)
    return out


def leaf_read_bytes(spans: Sequence[Span]) -> dict[int, int]:
    """Bytes one leaf of each layer takes to read (the spans of its parts; the largest leaf's)."""
    per_leaf: dict[tuple[int, int], int] = {}
    for s in spans:
        per_leaf[(s.layer, s.expert)] = per_leaf.get((s.layer, s.expert), 0) + s.length
    out: dict[int, int] = {}
    for (layer, _e), n in per_leaf.items():
        out[layer] = max(out.get(layer, 0), n)
    return out


@dataclass
class ReadCurve:
    """Bytes per second by number of concurrent readers (the mean of the sweeps, and the fastest
    sweep); what was read. The limits use the fastest read seen (:attr:`best`: a bound must not
    be below what the disk did), the pager's depth the means (:attr:`pager_readers`)."""

    bytes_per_second: dict[int, float]
    span_bytes: tuple[int, int]  # smallest and largest span read
    bytes_per_level: int
    direct: bool  # O_DIRECT was used (False: the file system refused it, cache dropped instead)
    sweeps: int = 1  # times each concurrency was read (bytes_per_second: their mean)
    peak_bytes_per_second: dict[int, float] | None = None  # the fastest sweep at each (None: the mean)

    @property
    def _peaks(self) -> dict[int, float]:
        return self.peak_bytes_per_second or self.bytes_per_second

    @property
    def best(self) -> float:
        return max(self._peaks.values())

    @property
    def best_readers(self) -> int:
        return max(self._peaks, key=lambda k: self._peaks[k])

    @property
    def pager_readers(self) -> int:
        """Readers for the pager (``--io-depth``): the fewest, of at least MIN_PAGER_READERS, that
        read within NEAR_BEST of the best of those; the best point where none of them comes within
        NEAR_BEST of the best overall. On a flat curve the best point is noise; fewer readers
        make a gate's several misses (and the prefetches beside them) wait for each other, which
        a throughput curve does not show, and each reader more queues more prefetch reads ahead
        of a gate's."""
        bps = self.bytes_per_second
        top = max(bps.values())
        many = {k: v for k, v in bps.items() if k >= MIN_PAGER_READERS}
        if not many or max(many.values()) < NEAR_BEST * top:
            return max(bps, key=lambda k: bps[k])
        best_many = max(many.values())
        return min(k for k, v in many.items() if v >= NEAR_BEST * best_many)

    def as_dict(self) -> dict[str, object]:
        return {"bytes_per_second": {str(k): v for k, v in self.bytes_per_second.items()},
                "span_bytes": list(self.span_bytes), "bytes_per_level": self.bytes_per_level,
                "direct": self.direct, "sweeps": self.sweeps,
                "peak_bytes_per_second": {str(k): v for k, v in self._peaks.items()},
                "best": self.best, "best_readers": self.best_readers,
                "pager_readers": self.pager_readers}


def random_read_curve(spans: Sequence[Span], readers: Sequence[int] = READERS, min_bytes: int = 256 << 20,
                      seed: int = 0, sweeps: int = SWEEPS) -> ReadCurve:
    """Read about ``min_bytes`` of randomly chosen ``spans`` at each concurrency of ``readers``
    (each span at most once per pass; more passes, reshuffled, when the spans are fewer), cold.
    ``sweeps`` times over the concurrencies, in their order and back again in turn; each point is
    the mean of its sweeps (a disk that bursts at first, then throttles, favours no concurrency)."""
    if not spans:
        raise ValueError("no spans to read")
    rng = np.random.default_rng(seed)
    files = sorted({s.path for s in spans})
    direct = _direct_ok(files[0])
    biggest = max(s.length for s in spans)
    got: dict[int, list[float]] = {n: [] for n in readers}
    level_bytes = 0
    passes = max(1, -(-min_bytes // sum(s.length for s in spans)))
    for n in [n for i in range(max(1, sweeps)) for n in (readers if i % 2 == 0 else readers[::-1])]:
        order = [spans[i] for _ in range(passes) for i in rng.permutation(len(spans))]
        todo: list[Span] = []
        total = 0
        for s in order:
            if total >= min_bytes:
                break
            todo.append(s)
            total += s.length
        for f in files:
            drop_page_cache(f)
        got[n].append(_read_all(todo, n, biggest, direct))
        level_bytes = total
    out = {n: float(np.mean(v)) for n, v in got.items()}
    peak = {n: float(max(v)) for n, v in got.items()}
    return ReadCurve(out, (min(s.length for s in spans), biggest), level_bytes, direct, max(1, sweeps), peak)


def _direct_ok(path: Path) -> bool:
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def _read_all(todo: Sequence[Span], n_readers: int, buf_bytes: int, direct: bool) -> float:
    """Bytes per second for ``n_readers`` threads taking ``todo`` in turn."""
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = {p: os.open(p, flags) for p in {s.path for s in todo}}
    bufs = [mmap.mmap(-1, buf_bytes) for _ in range(n_readers)]  # page-aligned, as O_DIRECT needs
    for b in bufs:  # faulted in now, so that page faults are not timed
        b.write(bytes(buf_bytes))
    next_i = iter(range(len(todo)))
    lock = threading.Lock()
    done = [0] * n_readers
    errors: list[BaseException] = []

    def reader(k: int) -> None:
        view = memoryview(bufs[k])
        try:
            while True:
                with lock:
                    i = next(next_i, None)
                if i is None:
                    return
                s = todo[i]
                got = 0
                while got < s.length:
                    r = os.preadv(fds[s.path], [view[got:s.length]], s.offset + got)
                    if r <= 0:
                        break
                    got += r
                done[k] += got
        except BaseException as e:  # noqa: BLE001 - reported by the caller's thread
            errors.append(e)
        finally:
            view.release()

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(n_readers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    for b in bufs:
        b.close()
    if errors:
        raise errors[0]
    return sum(done) / max(seconds, 1e-9)
