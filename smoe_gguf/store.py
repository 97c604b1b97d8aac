"""The shard store: where every leaf part lives on disk, and the reads that bring it into memory.

Reads bypass the page cache (O_DIRECT on Linux, F_NOCACHE on macOS), so the X-Slot budget is the
only cache of expert bytes and ``bytes_read`` is what really came off the disk. O_DIRECT needs
block-aligned offsets, lengths and buffers: a part is read as the aligned span around it into a
page-aligned bounce buffer and copied into its place (pack parts start on 4 KiB boundaries, so
the span is the part plus the padding up to the next boundary).

Checksums: each part's sha256 (from the pack manifest) is checked the first time it is read in
a process (``checksums="first"``, the default), on every read (``"always"``) or never
(``"never"``). A plain GGUF has no checksums.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import SmoeError
from .moe import MoEModel
from .pack import manifest as mf
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


@dataclass
class StoreStats:
    bytes_read: int = 0  # bytes that came off the disk (aligned spans)
    part_reads: int = 0
    read_seconds: float = 0.0
    hash_seconds: float = 0.0
    checked_parts: int = 0


class LeafStore:
    """Leaf parts by (layer, expert); ``read_part`` copies one into a writable buffer."""

    def __init__(self, leaves: dict[tuple[int, int], list[PartLoc]], checksums: str = "first", direct: bool = True):
        if checksums not in ("first", "always", "never"):
            raise SmoeError(f"checksums must be first, always or never, not {checksums!r}")
        self.leaves = leaves
        self.checksums = checksums
        self.direct = direct
        self.stats = StoreStats()
        self._checked: set[tuple[int, int, int]] = set()
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self.direct_io_used = False
        self.pack: Path | None = None  # the pack directory every shard must be inside (None: a plain GGUF)

    @classmethod
    def from_pack(cls, pack: Path, manifest: mf.Manifest, **kw: object) -> "LeafStore":
        leaves = {
            (lf.layer, lf.expert): [
                PartLoc(p.tensor, p.part, p.stage, pack / lf.file, p.offset, p.length, p.sha256) for p in lf.parts
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

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    # ------------------------------------------------------------------------------------------

    def _fd(self, loc: PartLoc, label: str) -> int:
        fd = self._fds.get(loc.path)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(loc.path)
            if fd is None:
                fd = self._open(loc.path, label)
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
                return fd
            except SmoeError:
                pass  # this filesystem may have no O_DIRECT (tmpfs): try without, which says why if not
        fd = open_regular(path, follow=follow, prefix=prefix)
        if self.direct and sys.platform == "darwin":
            import fcntl

            fcntl.fcntl(fd, _F_NOCACHE, 1)
            self.direct_io_used = True
        return fd

    def _bounce(self, size: int) -> mmap.mmap:
        buf: mmap.mmap | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            if buf is not None:
                buf.close()
            buf = mmap.mmap(-1, max(size, 1 << 20))
            self._local.buf = buf
        return buf

    def read_part(self, layer: int, expert: int, index: int, dest: memoryview) -> int:
        """Read part ``index`` of leaf (layer, expert) into ``dest`` (its exact length); bytes read."""
        loc = self.leaves[(layer, expert)][index]
        label = f"layer {layer} expert {expert} part {loc.part}"
        fd = self._fd(loc, label)
        t0 = time.perf_counter()
        start = loc.offset - loc.offset % BLOCK
        span = -(-(loc.offset + loc.length - start) // BLOCK) * BLOCK
        buf = self._bounce(span)
        view = memoryview(buf)[:span]
        got = 0
        try:
            while got < span:
                n = os.preadv(fd, [view[got:]], start + got)
                if n <= 0:
                    break
                got += n
        except OSError as e:
            raise SmoeError(f"{label}: read failed in {loc.path}: {e.strerror}") from None
        head = loc.offset - start
        if got < head + loc.length:
            raise SmoeError(f"{label}: shard {loc.path} is truncated")
        t1 = time.perf_counter()
        key = (layer, expert, index)
        with view[head : head + loc.length] as data:
            if loc.sha256 is not None and (
                self.checksums == "always" or (self.checksums == "first" and key not in self._checked)
            ):
                if hashlib.sha256(data).hexdigest() != loc.sha256:
                    raise SmoeError(f"{label}: checksum mismatch in {loc.path}")
                self._checked.add(key)
                self.stats.checked_parts += 1
            dest[:] = data
        view.release()
        t2 = time.perf_counter()
        with self._lock:
            self.stats.bytes_read += got
            self.stats.part_reads += 1
            self.stats.read_seconds += t1 - t0
            self.stats.hash_seconds += t2 - t1
        return got


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

