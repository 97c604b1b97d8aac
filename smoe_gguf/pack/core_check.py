"""The pack's ``core.gguf`` checked before llama.cpp loads it.

Its sha256 is compared with the manifest's the first time a process is started on it; a
match is remembered in the user's cache directory (``$XDG_CACHE_HOME/smoe-gguf/checked/``) by
the file's device, inode, size, modification and change times, so later starts skip the hash
until the file is touched (a write changes its change time, which no user can set back).
The manifest is then checked against the core's own header: the architecture, the expert
counts and the dense tensors must agree, so a manifest edited by hand cannot describe another
model than the core llama.cpp loads.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from smoe_gguf import archs
from smoe_gguf.errors import SmoeError
from smoe_gguf.gguf_layout import GGUFLayout, read_layout
from smoe_gguf.safeio import open_in_pack

from . import manifest as mf
from .verify import file_sha256


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "smoe-gguf" / "checked"


def _stamp(st: os.stat_result, sha256: str) -> dict[str, int | str]:
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "sha256": sha256}


def _cache_file(path: Path) -> Path:
    return _cache_dir() / (hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:32] + ".json")


def _remembered(path: Path, stamp: dict[str, int | str]) -> bool:
    try:
        return bool(json.loads(_cache_file(path).read_text(encoding="utf-8")) == stamp)
    except (OSError, ValueError, RecursionError):
        return False


def _remember(path: Path, stamp: dict[str, int | str]) -> None:
    """Best effort: a read-only or missing cache only costs a hash at the next start."""
    target = _cache_file(path)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(stamp), encoding="utf-8")
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)


def check_core(pack: Path, m: mf.Manifest) -> GGUFLayout:
    """Check the pack's core.gguf against the manifest (size, sha256, header); its layout."""
    path = pack / mf.CORE_FILE
    hint = f"(run `smoe-gguf verify {pack}`)"
    fd = open_in_pack(pack, mf.CORE_FILE, prefix="pack core ")
    try:
        st = os.fstat(fd)
        if st.st_size != m.core.size:
            raise SmoeError(f"{path}: {st.st_size} bytes, the manifest says {m.core.size}: the pack is damaged {hint}")
        stamp = _stamp(st, m.core.sha256)
        if not _remembered(path, stamp):
            try:
                sha = file_sha256(fd)
            except OSError as e:
                raise SmoeError(f"{path}: cannot read: {e.strerror}") from None
            if sha != m.core.sha256:
                raise SmoeError(f"{path}: checksum mismatch: the pack is damaged {hint}")
            _remember(path, stamp)
    finally:
        os.close(fd)
    core = read_layout(path)
    _match_manifest(core, m)
    return core


def _match_manifest(core: GGUFLayout, m: mf.Manifest) -> None:
    """The manifest must describe the model whose core this is."""
    arch = core.architecture

    def key(what: str) -> object:
        return core.value(archs.meta_key(arch, what))

    problems = []
    if arch != m.arch:
        problems.append(f"architecture {m.arch!r}, the core's is {arch!r}")
    for what, mine in (("block_count", m.n_layer), ("expert_count", m.n_expert), ("expert_used_count", m.n_expert_used)):
        if key(what) != mine:
            problems.append(f"{what} {mine}, the core's is {key(what)}")
    if core.alignment != m.alignment:
        problems.append(f"alignment {m.alignment}, the core's is {core.alignment}")
    if core.value("split.tensors.count") != len(m.tensors):
        problems.append(f"{len(m.tensors)} tensors, the core's header says {core.value('split.tensors.count')}")
    mine_core = [(t.name, t.ggml_type, tuple(t.shape), t.core_offset) for t in m.tensors if t.where == "core"]
    theirs = [(t.name, t.ggml_type, t.shape, t.offset) for t in core.tensors]
    if mine_core != theirs:
        problems.append("dense tensors that are not the core's")
    if problems:
        raise SmoeError(f"{core.path.parent / mf.MANIFEST}: does not match {mf.CORE_FILE}: the manifest says "
                        + "; ".join(problems))
