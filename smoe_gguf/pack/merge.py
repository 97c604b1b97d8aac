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

from smoe_gguf import archs
from smoe_gguf.errors import SmoeError
from smoe_gguf.safeio import clean_leftovers, leftover_name, open_in_pack, open_regular, os_error, read_file, refuse_input

from . import manifest as mf
from .verify import check_file, read_part

Progress = Callable[[int, int], None]


def merge(
    pack: str | os.PathLike[str],
    out: str | os.PathLike[str],
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    d = Path(pack)
    m = mf.load(d)
    dst = Path(os.path.abspath(out))
    refuse_input(dst, [d], "output")
    if os.path.lexists(dst):
        if dst.is_symlink() or not dst.is_file():
            what = "a directory" if dst.is_dir() else "not a regular file"
            raise SmoeError(f"{dst}: is {what}; not replaced")
        if not force:
            raise SmoeError(f"{dst}: already exists (use --force to replace it)")
        if not _is_gguf(dst):
            raise SmoeError(f"{dst}: is not a GGUF file; --force replaces only a GGUF")
    elif dst.parent.exists() and not dst.parent.is_dir():
        raise SmoeError(f"{dst}: {dst.parent} is not a directory")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, dst.parent) from None
    clean_leftovers(dst.parent, dst.name)
    free = shutil.disk_usage(dst.parent).free
    if free < m.source.size:
        raise SmoeError(
            f"not enough free disk at {dst.parent}: the model needs {m.source.size / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB free"
        )
    tmp = dst.parent / leftover_name(dst.name, "partial")
    tmp.unlink(missing_ok=True)  # this process's own, from an earlier call
    try:
        _write(d, m, tmp, progress)
        os.replace(tmp, dst)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise os_error(e, dst) from None
        raise
    return dst


def _is_gguf(path: Path) -> bool:
    try:
        fd = open_regular(path)
    except SmoeError:
        return False
    try:
        return os.pread(fd, 4, 0) == b"GGUF"
    except OSError:
        return False
    finally:
        os.close(fd)


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

    fault = check_file(d, m.header, quick=False) or check_file(d, m.core, quick=False)
    if fault is not None:
        raise SmoeError(f"{d / fault.what}: {fault.problem}")
    header = read_file(d / mf.HEADER_FILE, follow=False, limit=m.header.size)
    with open(tmp, "xb") as out, os.fdopen(open_in_pack(d, mf.CORE_FILE), "rb") as core:
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
        raise SmoeError(f"{d}: merged bytes do not match the source's sha256, though every file matches its own: "
                        f"the manifest's tensors or leaves are not those of the source")
