"""`smoe-gguf verify`: check every file and part of a pack against its manifest."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import SmoeError
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


def read_part(pack: Path, leaf: mf.LeafEntry, part: mf.PartEntry, check: bool = True) -> bytes:
    """Read one part of one leaf; a missing, short or corrupt part raises SmoeError naming it."""
    try:
        with open(pack / leaf.file, "rb") as f:
            f.seek(part.offset)
            blob = f.read(part.length)
    except FileNotFoundError:
        raise SmoeError(f"{part_label(leaf, part)}: shard {leaf.file} is missing") from None
    if len(blob) != part.length:
        raise SmoeError(f"{part_label(leaf, part)}: shard {leaf.file} is truncated")
    if check and hashlib.sha256(blob).hexdigest() != part.sha256:
        raise SmoeError(f"{part_label(leaf, part)}: checksum mismatch in {leaf.file}")
    return blob


def _check_file(pack: Path, entry: mf.FileEntry, quick: bool) -> Fault | None:
    path = pack / entry.file
    if not path.is_file():
        return Fault(entry.file, "missing")
    size = path.stat().st_size
    if size != entry.size:
        return Fault(entry.file, f"size {size}, expected {entry.size}")
    if not quick:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while blob := f.read(16 << 20):
                h.update(blob)
        if h.hexdigest() != entry.sha256:
            return Fault(entry.file, "checksum mismatch")
    return None


def verify(pack: str | os.PathLike[str], quick: bool = False, progress: Progress | None = None) -> list[Fault]:
    """Every fault found, by (layer, expert, part) for leaves; empty when the pack is sound."""
    d = Path(pack)
    m = mf.load(d)
    faults = [f for e in (m.core, m.header) if (f := _check_file(d, e, quick)) is not None]
    total = sum(lf.nbytes for lf in m.leaves)
    done = 0
    for leaf in m.leaves:
        path = d / leaf.file
        size = path.stat().st_size if path.is_file() else None
        for part in leaf.parts:
            if size is None:
                faults.append(Fault(part_label(leaf, part), f"shard {leaf.file} is missing"))
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
