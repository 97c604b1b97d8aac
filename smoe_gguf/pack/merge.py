"""`smoe-gguf merge`: rebuild the source GGUF from a pack, byte for byte.

The pack keeps the source's exact header bytes and any non-zero padding, so the merged file is
byte-identical to the source; the source's sha256 in the manifest is checked before the file
is put in place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .. import archs
from ..errors import SmoeError
from . import manifest as mf
from .verify import read_part

Progress = Callable[[int, int], None]


def merge(
    pack: str | os.PathLike[str],
    out: str | os.PathLike[str],
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    d = Path(pack)
    m = mf.load(d)
    dst = Path(out)
    if dst.exists() and not force:
        raise SmoeError(f"{dst}: already exists (use --force to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dst.parent).free
    if free < m.source.size:
        raise SmoeError(
            f"not enough free disk at {dst.parent}: the model needs {m.source.size / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB free"
        )
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    try:
        _write(d, m, tmp, progress)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


def _write(d: Path, m: mf.Manifest, tmp: Path, progress: Progress | None) -> None:
    parts: dict[str, list[tuple[mf.LeafEntry, mf.PartEntry]]] = {}
    for leaf in sorted(m.leaves, key=lambda lf: lf.expert):
        for p in leaf.parts:
            parts.setdefault(p.tensor, []).append((leaf, p))
    h = hashlib.sha256()
    done = 0

    def put(out: "os.PathLike[str] | object", blob: bytes) -> None:
        nonlocal done
        h.update(blob)
        out.write(blob)  # type: ignore[attr-defined]
        done += len(blob)
        if progress is not None:
            progress(done, m.source.size)

    header = (d / mf.HEADER_FILE).read_bytes() if (d / mf.HEADER_FILE).is_file() else b""
    if hashlib.sha256(header).hexdigest() != m.header.sha256:
        raise SmoeError(f"{d / mf.HEADER_FILE}: missing or corrupt")
    with open(tmp, "wb") as out, open(d / mf.CORE_FILE, "rb") as core:
        put(out, header)
        for t in m.tensors:
            gap = t.offset - out.tell()
            put(out, bytes.fromhex(t.pad_hex) if t.pad_hex else b"\0" * gap)
            if t.where == "core":
                assert t.core_offset is not None
                core.seek(t.core_offset)
                left = t.nbytes
                while left:
                    blob = core.read(min(16 << 20, left))
                    if not blob:
                        raise SmoeError(f"{d / mf.CORE_FILE}: truncated (tensor {t.name})")
                    put(out, blob)
                    left -= len(blob)
            else:
                slices = parts.get(t.name, [])
                if len(slices) != m.n_expert or archs.parse_expert_tensor(t.name) is None:
                    raise SmoeError(f"{d}: manifest lists {len(slices)} of {m.n_expert} slices of {t.name}")
                for leaf, p in slices:
                    put(out, read_part(d, leaf, p))
        put(out, bytes.fromhex(m.tail_hex))
    if h.hexdigest() != m.source.sha256:
        raise SmoeError(f"{d}: merged bytes do not match the source's sha256 (corrupt core.gguf?)")
