"""`smoe-gguf verify`: check every file and part of a pack against its manifest."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from smoe_gguf.errors import SmoeError
from smoe_gguf.safeio import in_pack, open_in_pack, open_regular

from . import manifest as mf

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Fault:
    what: str  # "layer 3 expert 12 part down", "core.gguf", ...
    problem: str

    def __str__(self) -> str:
        return f"{self.what}: {self.problem}"


def part_label(leaf: mf.LeafEntry, part: mf.PartEntry | None = None) -> str:
    label = f"layer {leaf.layer} expert {leaf.expert}"
    return label if part is None else f"{label} part {part.part}"


def _open_shard(pack: Path, leaf: mf.LeafEntry, part: mf.PartEntry) -> int:
    prefix = f"{part_label(leaf, part)}: shard "
    path = in_pack(pack, leaf.file, prefix)
    if not os.path.lexists(path):
        raise SmoeError(f"{part_label(leaf, part)}: shard {leaf.file} is missing")
    return open_regular(path, follow=False, prefix=prefix)


def read_part(pack: Path, leaf: mf.LeafEntry, part: mf.PartEntry, check: bool = True) -> bytes:
    """Read one part of one leaf; a missing, short or corrupt part raises SmoeError naming it."""
    fd = _open_shard(pack, leaf, part)
    try:
        blob = os.pread(fd, part.length, part.offset)
    except OSError as e:
        raise SmoeError(f"{part_label(leaf, part)}: cannot read shard {leaf.file}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(blob) != part.length:
        raise SmoeError(f"{part_label(leaf, part)}: shard {leaf.file} is truncated")
    if check and hashlib.sha256(blob).hexdigest() != part.sha256:
        raise SmoeError(f"{part_label(leaf, part)}: checksum mismatch in {leaf.file}")
    return blob


def file_sha256(fd: int) -> str:
    """The sha256 of an open file's bytes, read from its start."""
    h = hashlib.sha256()
    pos = 0
    while blob := os.pread(fd, 16 << 20, pos):
        h.update(blob)
        pos += len(blob)
    return h.hexdigest()


def path_sha256(path: Path) -> str:
    """The sha256 of the file at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return file_sha256(fd)
    finally:
        os.close(fd)


def check_file(pack: Path, entry: mf.FileEntry, quick: bool) -> Fault | None:
    path = pack / entry.file
    if not os.path.lexists(path):
        return Fault(entry.file, "missing")
    try:
        fd = open_in_pack(pack, entry.file)
    except SmoeError as e:
        return Fault(entry.file, str(e).rsplit(": ", 1)[-1])
    try:
        size = os.fstat(fd).st_size
        if size != entry.size:
            return Fault(entry.file, f"size {size}, expected {entry.size}")
        if not quick and file_sha256(fd) != entry.sha256:
            return Fault(entry.file, "checksum mismatch")
    except OSError as e:
        return Fault(entry.file, f"cannot read: {e.strerror}")
    finally:
        os.close(fd)
    return None


def verify(pack: str | os.PathLike[str], quick: bool = False, progress: Progress | None = None) -> list[Fault]:
    """Every fault found, by (layer, expert, part) for leaves; empty when the pack is sound."""
    d = Path(pack)
    m = mf.load(d)
    faults = [f for e in (m.core, m.header) if (f := check_file(d, e, quick)) is not None]
    total = sum(lf.nbytes for lf in m.leaves)
    done = 0
    for leaf in m.leaves:
        size: int | None = None
        problem = f"shard {leaf.file} is missing"
        try:
            fd = _open_shard(d, leaf, leaf.parts[0])
            size = os.fstat(fd).st_size
            os.close(fd)
        except SmoeError as e:
            problem = str(e).split(": ", 1)[1]
        for part in leaf.parts:
            if size is None:
                faults.append(Fault(part_label(leaf, part), problem))
            elif size < part.offset + part.length:
                faults.append(Fault(part_label(leaf, part), f"shard {leaf.file} is truncated ({size} bytes)"))
            elif not quick:
                try:
                    read_part(d, leaf, part)
                except SmoeError as e:
                    faults.append(Fault(part_label(leaf, part), str(e).split(": ", 1)[1]))
            done += part.length
        if progress is not None:
            progress(done, total)
    return faults
