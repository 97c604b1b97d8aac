"""What the engine loads: the files llama.cpp opens and the store the leaves come from.

A pack gives llama.cpp its ``core.gguf`` (split 1 of 2) and a sparse *expert stub* (split 2:
the expert tensors' infos, then a hole), written to a temporary directory, so llama.cpp never
sees a real expert byte. The stub is the other half of the split-1-of-2 contract of
:mod:`smoe_gguf.pack.split`: it gives llama.cpp the expert tensors' names, types and shapes; the
X-Slot keeps the loader from reading their ranges (:mod:`smoe_gguf.xslot`), so the hole is never
read. A plain GGUF is given to llama.cpp whole; its leaves are read from it by offset, and the
loader reads only its core tensors for the same reason.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import archs
from .budget import page_cost
from .gguf_layout import (
    T_UINT16,
    T_UINT32,
    GGUFLayout,
    align_up,
    encode_kv,
    encode_tensor_info,
    quick_identity,
    read_layout,
    write_header,
)
from .moe import analyze
from .pack import manifest as mf
from .pack.core_check import check_core
from .readpool import DEFAULT_IO_DEPTH
from .store import LeafStore


@dataclass
class Source:
    """What the engine loads: the files llama.cpp opens and where the leaves come from."""

    path: Path
    kind: str  # "pack" or "gguf"
    llama_paths: list[Path]
    store: LeafStore
    core_bytes: int
    expert_bytes: int
    n_expert: int
    n_expert_used: int
    model_id: str  # the source's identity (profiles are keyed by it)
    core: GGUFLayout  # the GGUF that holds the core's tensors (a pack's core.gguf, else the model)
    stub_dir: tempfile.TemporaryDirectory[str] | None = None


def write_expert_stub(path: Path, m: mf.Manifest) -> int:
    """Split 2 of a pack's model: the expert tensors' infos and a hole of their size (llama.cpp
    checks that every tensor lies inside the file; it reads none of the hole). Its size."""
    infos, rel = [], 0
    for t in m.tensors:
        if t.where == "leaves":
            infos.append(encode_tensor_info(t.name, t.ggml_type, tuple(t.shape), rel))
            rel = align_up(rel + t.nbytes, m.alignment)
    kvs = [encode_kv("general.alignment", T_UINT32, m.alignment), encode_kv("split.no", T_UINT16, 1)]
    with open(path, "wb") as f:
        data = write_header(f, 3, kvs, infos, m.alignment)
        f.truncate(data + rel)
    return data + rel


def open_source(path: Path, checksums: str = "first", io_depth: int = DEFAULT_IO_DEPTH) -> Source:
    """A pack directory or a plain MoE GGUF, ready for the engine to load; its leaves are read
    ``io_depth`` parts at once."""
    if path.is_dir():
        m = mf.load(path)
        archs.require_supported(m.arch, str(path))
        core = check_core(path, m)  # llama.cpp loads only a core whose sha256 the manifest gives
        stub_dir = tempfile.TemporaryDirectory(prefix="smoe-stub-")
        stub = Path(stub_dir.name) / "experts-stub.gguf"
        write_expert_stub(stub, m)
        return Source(
            path, "pack", [path / mf.CORE_FILE, stub], LeafStore.from_pack(path, m, checksums=checksums, io_depth=io_depth),
            m.core_bytes, m.expert_bytes, m.n_expert, m.n_expert_used, _pack_identity(m), core, stub_dir,
        )
    model = analyze(read_layout(path)).require_moe()
    return Source(
        path, "gguf", [path], LeafStore.from_gguf(model, checksums=checksums, io_depth=io_depth),
        model.core_bytes, model.expert_bytes, model.n_expert, model.n_expert_used, quick_identity(path),
        model.layout,
    )


def model_identity(path: Path) -> tuple[str, int, int]:
    """(identity, layers, experts per layer) of a pack or a plain MoE GGUF, without loading it.
    The layers are those llama.cpp runs: MTP blocks at the end (never loaded) are not counted."""
    if path.is_dir():
        m = mf.load(path)
        return _pack_identity(m), m.n_layer - archs.nextn_layers(read_layout(path / mf.CORE_FILE)), m.n_expert
    model = analyze(read_layout(path)).require_moe()
    return quick_identity(path), model.n_layer - archs.nextn_layers(model.layout), model.n_expert


def leaf_footprint(path: Path) -> tuple[int, int]:
    """(every leaf's page footprint, the core's bytes) of a pack or a plain MoE GGUF, without
    loading it: what a budget is resolved against (:func:`smoe_gguf.budget.resolve`)."""
    if path.is_dir():
        m = mf.load(path)
        return LeafStore.from_pack(path, m).footprint(page_cost), m.core_bytes
    model = analyze(read_layout(path)).require_moe()
    return LeafStore.from_gguf(model).footprint(page_cost), model.core_bytes


def _pack_identity(m: mf.Manifest) -> str:
    """A pack's identity: its source GGUF's (:func:`quick_identity`, recorded at the split), or
    in a pack split before that was recorded, the source's sha256."""
    return m.source_id or m.source.sha256
