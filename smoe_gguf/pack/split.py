"""`smoe-gguf split`: rewrite a MoE GGUF into a pack (dense core + per-leaf shards + manifest).

One sequential pass over the source: every byte is read once, hashed into the source's sha256,
and sent to the core file or to its leaf file (each leaf part with its own sha256, and its XXH64
for the run-time check). The pack is built in a hidden sibling directory
and renamed into place only when complete, so an interrupted split leaves no pack behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from smoe_gguf.errors import SmoeError
from smoe_gguf.gguf_layout import (
    T_INT32,
    T_STRING,
    T_UINT16,
    T_UINT32,
    align_up,
    encode_kv,
    encode_tensor_info,
    quick_identity,
    read_layout,
    write_header,
)
from smoe_gguf.moe import MoEModel, analyze
from smoe_gguf.readpool import xxh64
from smoe_gguf.safeio import clean_leftovers, leftover_name, open_regular, os_error, read_file

from . import manifest as mf
from .verify import path_sha256

Progress = Callable[[int, int], None]
CHUNK = 16 << 20
# Keys the pack adds to the core. split.* make stock llama.cpp refuse the core on its own
# ("invalid split file name") instead of running it with its experts missing.
CORE_NOTE = (
    "dense core of a smoe-gguf pack: its routed experts are in the pack's leaves/. "
    "Run it with `smoe-gguf run`, or rebuild the full model with `smoe-gguf merge`."
)


def plan_leaf_layout(model: MoEModel, layer: int) -> tuple[list[int], int]:
    """Offsets of the layer's parts inside one leaf file, and the padded file size."""
    offsets, pos = [], 0
    for t in model.expert_tensors[layer]:
        offsets.append(pos)
        pos = align_up(pos + t.slice_bytes, mf.PART_ALIGNMENT)
    return offsets, pos


def required_bytes(model: MoEModel) -> int:
    """Disk space a pack of ``model`` takes (a little over, never under)."""
    leaves = sum(plan_leaf_layout(model, layer)[1] * model.n_expert for layer in model.moe_layers)
    core = model.layout.data_offset + sum(align_up(t.nbytes, model.layout.alignment) for t in model.core_tensors)
    return leaves + core + model.layout.data_offset + 600 * model.n_leaves + (4 << 20)


def _core_kvs(model: MoEModel) -> list[bytes]:
    layout = model.layout
    blobs = [kv.raw for kv in layout.kvs.values()]
    blobs += [
        encode_kv("split.no", T_UINT16, 0),
        encode_kv("split.count", T_UINT16, 2),
        encode_kv("split.tensors.count", T_INT32, len(layout.tensors)),
        encode_kv("smoe.pack.version", T_UINT32, mf.FORMAT_VERSION),
        encode_kv("smoe.pack.note", T_STRING, CORE_NOTE),
    ]
    return blobs


def split(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    force: bool = False,
    progress: Progress | None = None,
) -> mf.Manifest:
    src = Path(source)
    dst = Path(os.path.abspath(out))
    layout = read_layout(src)
    model = analyze(layout).require_moe()
    _check_output(dst, src, force)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, dst.parent) from None
    clean_leftovers(dst.parent, dst.name)
    need = required_bytes(model)
    free = shutil.disk_usage(dst.parent).free
    if free < need:
        raise SmoeError(
            f"not enough free disk at {dst.parent}: the pack needs {need / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB free"
        )
    tmp = dst.parent / leftover_name(dst.name, "partial")
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own, from an earlier call
    try:
        tmp.mkdir()
        manifest = _write_pack(model, tmp, progress)
        if dst.exists():
            old = dst.parent / leftover_name(dst.name, "old")
            os.replace(dst, old)
            try:
                os.replace(tmp, dst)
            except BaseException:
                os.replace(old, dst)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
        return manifest
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise os_error(e, dst) from None
        raise


def is_pack(path: Path) -> bool:
    """Whether ``path`` is a directory holding a smoe-gguf manifest (sound or not)."""
    try:
        raw = json.loads(read_file(path / mf.MANIFEST, follow=False, limit=mf.MAX_MANIFEST_BYTES))
    except (SmoeError, ValueError, RecursionError):
        return False
    return isinstance(raw, dict) and raw.get("format") == mf.FORMAT


def _check_output(dst: Path, src: Path, force: bool) -> None:
    """Refuse an output that would replace the source, or anything but a pack or an empty directory."""
    real = Path(os.path.realpath(dst))
    if real == Path(os.path.realpath(src)) or Path(os.path.realpath(src)).is_relative_to(real):
        raise SmoeError(f"{dst}: the output would replace the source")
    if Path(os.path.realpath(os.getcwd())).is_relative_to(real):
        raise SmoeError(f"{dst}: is the current directory or holds it; write the pack somewhere else")
    if not os.path.lexists(dst):
        if dst.parent.exists() and not dst.parent.is_dir():
            raise SmoeError(f"{dst}: {dst.parent} is not a directory")
        return
    if dst.is_symlink() or not dst.is_dir():
        raise SmoeError(f"{dst}: already exists and is not a pack directory; not replaced")
    if not force:
        raise SmoeError(f"{dst}: already exists (use --force to replace it)")
    if not is_pack(dst) and any(dst.iterdir()):
        raise SmoeError(f"{dst}: is not a pack (no smoe-gguf {mf.MANIFEST}) and not empty; "
                        "--force replaces only a pack or an empty directory")


def _write_pack(model: MoEModel, d: Path, progress: Progress | None) -> mf.Manifest:
    layout = model.layout
    src_hash = hashlib.sha256()
    done = 0
    total = layout.file_size

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    # Core header: the source's key/values plus the pack's, then the dense tensors' infos.
    core_infos, core_rel, rel = [], {}, 0
    for t in model.core_tensors:
        core_rel[t.name] = rel
        core_infos.append(encode_tensor_info(t.name, t.ggml_type, t.shape, rel))
        rel = align_up(rel + t.nbytes, layout.alignment)

    leaf_layout = {layer: plan_leaf_layout(model, layer) for layer in model.moe_layers}
    part_index = {
        t.info.name: (layer, i) for layer, ts in model.expert_tensors.items() for i, t in enumerate(ts)
    }
    part_hashes: dict[tuple[int, int, int], tuple[str, str]] = {}  # (sha256, xxh64)
    tensors: list[mf.TensorEntry] = []
    for layer in model.moe_layers:
        (d / mf.leaf_file(layer, 0)).parent.mkdir(parents=True, exist_ok=True)

    with os.fdopen(open_regular(layout.path), "rb") as f, open(d / mf.CORE_FILE, "wb") as core:
        header = f.read(layout.data_offset)
        src_hash.update(header)
        tick(len(header))
        (d / mf.HEADER_FILE).write_bytes(header)
        core_data = write_header(core, layout.version, _core_kvs(model), core_infos, layout.alignment)

        for t in layout.tensors:
            entry = mf.TensorEntry(t.name, t.type_name, t.ggml_type, list(t.shape), t.offset, t.nbytes, "core")
            # The padding before this tensor: zeros in every writer we know; kept if not.
            if t.offset < f.tell():
                raise SmoeError(f"{layout.path}: tensor data out of order at {t.name}: not supported")
            pad = f.read(t.offset - f.tell())
            src_hash.update(pad)
            tick(len(pad))
            if pad.strip(b"\0"):
                entry.pad_hex = pad.hex()
            if t.name in part_index:
                entry.where = "leaves"
                layer, pi = part_index[t.name]
                et = model.expert_tensors[layer][pi]
                offsets, size = leaf_layout[layer]
                for e in range(model.n_expert):
                    blob = f.read(et.slice_bytes)
                    src_hash.update(blob)
                    part_hashes[(layer, e, pi)] = (hashlib.sha256(blob).hexdigest(), f"{xxh64(blob):016x}")
                    fd = os.open(d / mf.leaf_file(layer, e), os.O_WRONLY | os.O_CREAT, 0o644)
                    try:
                        os.pwrite(fd, blob, offsets[pi])
                        os.ftruncate(fd, size)
                    finally:
                        os.close(fd)
                    tick(len(blob))
            else:
                entry.core_offset = core_data + core_rel[t.name]
                core.seek(entry.core_offset)
                left = t.nbytes
                while left:
                    blob = f.read(min(CHUNK, left))
                    src_hash.update(blob)
                    core.write(blob)
                    left -= len(blob)
                    tick(len(blob))
            tensors.append(entry)
        tail = f.read()
        src_hash.update(tail)
        tick(len(tail))
        if len(tail) > 1 << 20:
            raise SmoeError(f"{layout.path}: {len(tail)} unexpected bytes after the last tensor")
        # Pad the core's last tensor like every other one.
        core.seek(0, os.SEEK_END)
        core.write(b"\0" * (align_up(core.tell(), layout.alignment) - core.tell()))

    leaves = []
    for layer in model.moe_layers:
        offsets, size = leaf_layout[layer]
        for e in range(model.n_expert):
            parts = [
                mf.PartEntry(
                    part=et.part,
                    tensor=et.info.name,
                    stage=et.stage,
                    offset=offsets[pi],
                    length=et.slice_bytes,
                    type=et.info.type_name,
                    shape=list(et.slice_shape),
                    sha256=part_hashes[(layer, e, pi)][0],
                    xxh64=part_hashes[(layer, e, pi)][1],
                )
                for pi, et in enumerate(model.expert_tensors[layer])
            ]
            leaves.append(mf.LeafEntry(layer, e, mf.leaf_file(layer, e), size, parts))

    manifest = mf.Manifest(
        source=mf.FileEntry(layout.path.name, layout.file_size, src_hash.hexdigest()),
        source_id=quick_identity(layout.path),
        arch=model.arch,
        n_layer=model.n_layer,
        n_expert=model.n_expert,
        n_expert_used=model.n_expert_used,
        n_expert_shared=model.n_expert_shared,
        alignment=layout.alignment,
        data_offset=layout.data_offset,
        core=mf.FileEntry(mf.CORE_FILE, (d / mf.CORE_FILE).stat().st_size, path_sha256(d / mf.CORE_FILE)),
        header=mf.FileEntry(mf.HEADER_FILE, len(header), hashlib.sha256(header).hexdigest()),
        core_bytes=model.core_bytes,
        expert_bytes=model.expert_bytes,
        tensors=tensors,
        leaves=leaves,
        tail_hex=tail.hex(),
    )
    mf.save(manifest, d)
    return manifest



