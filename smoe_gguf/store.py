"""The shard store: where every leaf part lives on disk, and the reads that bring it into memory.

Reads bypass the page cache (O_DIRECT on Linux, F_NOCACHE on macOS), so the X-Slot budget is the
only cache of expert bytes and ``bytes_read`` is what really came off the disk. They run on the
native reader threads of :mod:`smoe_gguf.readpool`, many parts at once, each straight into its
place where O_DIRECT's alignment allows (pack parts start on 4 KiB boundaries, and so do X-Slot
slices of a page-multiple size); elsewhere through a bounce buffer.

Checksums: each part's checksum (from the pack manifest: its XXH64, or its sha256 in packs split
before XXH64 was recorded) is checked, by the reader thread, the first time it is read in a process
(``checksums="first"``, the default), on every read (``"always"``) or never (``"never"``).
``smoe-gguf verify`` checks the sha256 of every file. A plain GGUF has no checksums.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import SmoeError
from .moe import MoEModel
from .pack import manifest as mf
from .readpool import DEFAULT_IO_DEPTH, MISMATCH, SHORT, Read, ReadPool, pool_function_addresses
from .safeio import in_pack, open_regular

BLOCK = 4096
_F_NOCACHE = 48  # macOS fcntl


@dataclass(frozen=True)
class PartLoc:
    tensor: str  # the merged tensor this part is a slice of
    part: str
    stage: int
    path: Path
    offset: int
    length: int
    sha256: str | None
    xxh64: int | None = None  # checked instead of sha256 where the pack gives it (faster)


@dataclass
class StoreStats:
    bytes_read: int = 0  # bytes that came off the disk (aligned spans)
    part_reads: int = 0
    in_place_reads: int = 0  # parts read straight into their destination (no bounce copy)
    read_seconds: float = 0.0  # summed over the reader threads (they overlap)
    hash_seconds: float = 0.0  # likewise
    checked_parts: int = 0
    batches: int = 0  # calls that read parts


class LeafStore:
    """Leaf parts by (layer, expert); :meth:`read_parts` reads some into memory, ``io_depth`` at once."""

    def __init__(self, leaves: dict[tuple[int, int], list[PartLoc]], checksums: str = "first", direct: bool = True,
                 io_depth: int = DEFAULT_IO_DEPTH):
        if checksums not in ("first", "always", "never"):
            raise SmoeError(f"checksums must be first, always or never, not {checksums!r}")
        self.leaves = leaves
        self.checksums = checksums
        self.direct = direct
        self.io_depth = io_depth
        self.stats = StoreStats()
        self._checked: set[tuple[int, int, int]] = set()
        self._fds: dict[Path, int] = {}
        self._o_direct: set[int] = set()  # descriptors opened with O_DIRECT (aligned reads only)
        self._lock = threading.Lock()
        self._pool: ReadPool | None = None
        self.direct_io_used = False
        self.pack: Path | None = None  # the pack directory every shard must be inside (None: a plain GGUF)

    @classmethod
    def from_pack(cls, pack: Path, manifest: mf.Manifest, **kw: object) -> "LeafStore":
        leaves = {
            (lf.layer, lf.expert): [
                PartLoc(p.tensor, p.part, p.stage, pack / lf.file, p.offset, p.length, p.sha256,
                        int(p.xxh64, 16) if p.xxh64 else None)
                for p in lf.parts
            ]
            for lf in manifest.leaves
        }
        store = cls(leaves, **kw)  # type: ignore[arg-type]
        store.pack = pack
        return store

    @classmethod
    def from_gguf(cls, model: MoEModel, **kw: object) -> "LeafStore":
        path = model.layout.path
        leaves = {
            (layer, e): [
                PartLoc(t.info.name, t.part, t.stage, path, t.slice_offset(e), t.slice_bytes, None) for t in ts
            ]
            for layer, ts in model.expert_tensors.items()
            for e in range(model.n_expert)
        }
        return cls(leaves, **kw)  # type: ignore[arg-type]

    def footprint(self, cost: Callable[[int], int]) -> int:
        """Sum of ``cost(part length)`` over every part of every leaf."""
        return sum(cost(p.length) for parts in self.leaves.values() for p in parts)

    def parts(self, layer: int, expert: int) -> list[PartLoc]:
        return self.leaves[(layer, expert)]

    def set_background_entries(self, n: int) -> int:
        """How many prefetched leaves the reader pool may read at once whatever their bytes
        (:meth:`ReadPool.set_background_entries`); the number set."""
        return self._readers().set_background_entries(n)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._o_direct.clear()

    # ------------------------------------------------------------------------------------------

    def _fd(self, layer: int, expert: int, loc: PartLoc) -> int:
        fd = self._fds.get(loc.path)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(loc.path)
            if fd is None:
                fd = self._open(loc.path, self._label(layer, expert, loc))
                self._fds[loc.path] = fd
        return fd

    def _open(self, path: Path, label: str) -> int:
        """Open a shard: a regular file (never a FIFO or a device), inside the pack, not a link."""
        prefix = f"{label}: shard "
        if self.pack is not None:
            path = in_pack(self.pack, path.relative_to(self.pack).as_posix(), prefix)
        if not os.path.lexists(path):
            raise SmoeError(f"{label}: shard {path} is missing")
        follow = self.pack is None
        if self.direct and hasattr(os, "O_DIRECT"):
            try:
                fd = open_regular(path, follow=follow, flags=os.O_DIRECT, prefix=prefix)
                self.direct_io_used = True
                self._o_direct.add(fd)
                return fd
            except SmoeError:
                pass  # this filesystem may have no O_DIRECT (tmpfs): try without, which says why if not
        fd = open_regular(path, follow=follow, prefix=prefix)
        if self.direct and sys.platform == "darwin":
            import fcntl

            fcntl.fcntl(fd, _F_NOCACHE, 1)
            self.direct_io_used = True
        return fd

    def _readers(self) -> ReadPool:
        pool = self._pool
        if pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ReadPool(self.io_depth)
                pool = self._pool
        return pool

    def count_native(self, delta: StoreStats) -> None:
        """Add the native pager's reads to :attr:`stats`."""
        with self._lock:
            for name, value in vars(delta).items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def native_readers(self) -> tuple[int, dict[str, int]]:
        """The reader pool and the addresses of its functions by name (``start``, ``finish``,
        ``cancel``, ``promote``), for the native pager."""
        return self._readers().address, pool_function_addresses()

    def leaf_fd(self, layer: int, expert: int) -> tuple[int, bool] | None:
        """Leaf (layer, expert)'s shard descriptor (opened now if it was not) and whether it was
        opened with O_DIRECT; None if it cannot be opened (a read of it says why)."""
        loc = self.leaves[(layer, expert)][0]
        try:
            fd = self._fd(layer, expert, loc)
        except (SmoeError, OSError):
            return None
        return fd, fd in self._o_direct

    def read_parts(self, items: Sequence[tuple[int, int, int, int]], urgent: bool = True) -> int:
        """Read parts into memory, all at once: ``items`` are (layer, expert, part index, address
        of the part's destination, which has room for exactly its bytes). ``urgent``: ahead of
        background reads.
        Returns the bytes read; raises for the first part that failed (the others were read)."""
        reads: list[Read] = []
        checked: list[tuple[int, int, int] | None] = []
        for layer, expert, index, dest in items:
            loc = self.leaves[(layer, expert)][index]
            fd = self._fd(layer, expert, loc)
            key = (layer, expert, index)
            check = loc.sha256 is not None and (
                self.checksums == "always" or (self.checksums == "first" and key not in self._checked))
            fast = check and loc.xxh64 is not None
            reads.append(Read(fd, fd in self._o_direct, loc.offset, loc.length, dest,
                              bytes.fromhex(loc.sha256) if check and not fast and loc.sha256 else None,
                              loc.xxh64 if fast else None))
            checked.append(key if check else None)
        outcomes = self._readers().run(reads, urgent)
        failure: str | None = None
        with self._lock:
            st = self.stats
            st.batches += 1
            for (layer, expert, index, _dest), out, key in zip(items, outcomes, checked, strict=True):
                st.bytes_read += out.bytes_read
                st.part_reads += 1
                st.in_place_reads += out.in_place
                st.read_seconds += out.read_seconds
                st.hash_seconds += out.hash_seconds
                if out.status == 0:
                    if key is not None:
                        self._checked.add(key)
                        st.checked_parts += 1
                elif failure is None:
                    loc = self.leaves[(layer, expert)][index]
                    label = self._label(layer, expert, loc)
                    if out.status == SHORT:
                        failure = f"{label}: shard {loc.path} is truncated"
                    elif out.status == MISMATCH:
                        failure = f"{label}: checksum mismatch in {loc.path}"
                    else:
                        failure = f"{label}: read failed in {loc.path}: {out.error()}"
        if failure is not None:
            raise SmoeError(failure)
        return sum(o.bytes_read for o in outcomes)

    @staticmethod
    def _label(layer: int, expert: int, loc: PartLoc) -> str:
        return f"layer {layer} expert {expert} part {loc.part}"


def drop_page_cache(path: str | os.PathLike[str]) -> None:
    """Ask the kernel to drop its cached pages of ``path`` (a file, or every file under a
    directory), so that the next read comes from the disk (start-up and benchmark measurements)."""
    root = Path(path)
    for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

