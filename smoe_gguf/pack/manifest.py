"""The pack's manifest: what `split` wrote, where every leaf part lives, and how to rebuild the source.

A pack is a directory::

    manifest.json        this file's contents (format, source identity, tensors, leaves)
    core.gguf            the dense core: every source key/value + every non-expert tensor
    source-header.bin    the source's exact header bytes (for a byte-identical merge)
    leaves/LLL/EEEE.leaf one file per leaf (layer LLL, expert EEEE); each part starts on a 4 KiB boundary
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gguf.constants import GGMLQuantizationType

from smoe_gguf import archs
from smoe_gguf.errors import SmoeError
from smoe_gguf.gguf_layout import is_power_of_two, tensor_nbytes
from smoe_gguf.moe import MAX_EXPERTS, MAX_LAYERS
from smoe_gguf.safeio import read_file

FORMAT = "smoe-gguf-pack"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CORE_FILE = "core.gguf"
HEADER_FILE = "source-header.bin"
PART_ALIGNMENT = 4096


def leaf_file(layer: int, expert: int) -> str:
    return f"leaves/{layer:03d}/{expert:04d}.leaf"


@dataclass
class FileEntry:
    file: str
    size: int
    sha256: str


@dataclass
class PartEntry:
    part: str  # gate, up, down, gate_bias, ...
    tensor: str  # source tensor name
    stage: int  # 0: needed by gate/up, 1: needed by down
    offset: int  # in the leaf file, a multiple of PART_ALIGNMENT
    length: int
    type: str  # ggml type name
    shape: list[int]  # of the slice, ggml order
    sha256: str
    xxh64: str = ""  # XXH64 (seed 0), 16 hex digits: the fast check of a first read ("" in older packs)


@dataclass
class LeafEntry:
    layer: int
    expert: int
    file: str
    size: int  # file size, padded to PART_ALIGNMENT
    parts: list[PartEntry]

    @property
    def nbytes(self) -> int:
        return sum(p.length for p in self.parts)


@dataclass
class TensorEntry:
    """One source tensor, in source order: enough to rebuild the source's data section."""

    name: str
    type: str
    ggml_type: int
    shape: list[int]
    offset: int  # absolute offset in the source
    nbytes: int
    where: str  # "core" or "leaves"
    core_offset: int | None = None  # absolute offset in core.gguf
    pad_hex: str = ""  # the padding bytes before this tensor, only where they are not all zero


@dataclass
class Manifest:
    source: FileEntry
    arch: str
    n_layer: int
    n_expert: int
    n_expert_used: int
    n_expert_shared: int
    alignment: int  # the source's general.alignment
    data_offset: int  # the source's data section start
    core: FileEntry
    header: FileEntry
    core_bytes: int  # bytes of dense-core tensor data
    expert_bytes: int
    tensors: list[TensorEntry]
    leaves: list[LeafEntry]
    tail_hex: str = ""  # bytes after the last tensor (its padding), kept verbatim
    source_id: str = ""  # the source's quick identity (gguf_layout.quick_identity; "" in older packs)
    format: str = FORMAT
    version: int = FORMAT_VERSION
    part_alignment: int = PART_ALIGNMENT
    _index: dict[tuple[int, int], LeafEntry] = field(default_factory=dict, repr=False, compare=False)

    def leaf(self, layer: int, expert: int) -> LeafEntry:
        if not self._index:
            self._index = {(lf.layer, lf.expert): lf for lf in self.leaves}
        return self._index[(layer, expert)]

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("_index")
        return json.dumps(d, indent=1)


def save(manifest: Manifest, directory: Path) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, directory / MANIFEST)


MAX_MANIFEST_BYTES = 1 << 28


def load(pack: str | os.PathLike[str]) -> Manifest:
    """Read and check a pack's manifest: every field of the right type and range, every file
    path the one `split` writes (so nothing leads outside the pack), every leaf of every MoE
    layer present once, parts that match their tensors. Anything else is a SmoeError."""
    d = Path(pack)
    path = d / MANIFEST
    if not d.exists():
        raise SmoeError(f"{d}: no such pack directory")
    if not d.is_dir():
        raise SmoeError(f"{d}: is a file, not a pack directory (a pack is what `smoe-gguf split MODEL -o DIR` writes)")
    if not path.exists() and not path.is_symlink():
        raise SmoeError(f"{d}: not a pack ({MANIFEST} missing)")
    data = read_file(path, follow=False, limit=MAX_MANIFEST_BYTES)
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SmoeError(f"{path}: unreadable manifest ({e})") from None
    except RecursionError:
        raise SmoeError(f"{path}: unreadable manifest (nested too deeply)") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise SmoeError(f"{path}: not a smoe-gguf manifest")
    if raw.get("version") != FORMAT_VERSION:
        raise SmoeError(
            f"{path}: pack format version {raw.get('version')}, this smoe-gguf reads {FORMAT_VERSION}: split again"
        )
    try:
        return _check(raw)
    except (_Bad, KeyError, TypeError, ValueError) as e:
        raise SmoeError(f"{path}: malformed manifest ({e})") from None


class _Bad(Exception):
    pass


def _int(d: dict[str, Any], key: str, lo: int = 0, hi: int = 1 << 62) -> int:
    v = d[key]
    if type(v) is not int or not lo <= v <= hi:
        raise _Bad(f"{key} is {v!r}, expected an integer in [{lo}, {hi}]")
    return v


def _str(d: dict[str, Any], key: str, pattern: re.Pattern[str] | None = None) -> str:
    v = d[key]
    if not isinstance(v, str) or (pattern is not None and not pattern.fullmatch(v)):
        raise _Bad(f"{key} is {str(v)[:80]!r}")
    return v


@functools.cache
def _names(cls: type) -> frozenset[str]:
    """The fields a manifest object of ``cls`` may have (looked up once per class: a manifest
    has an object per leaf)."""
    return frozenset(f.name for f in fields(cls) if not f.name.startswith("_"))


def _fields(d: Any, cls: type, what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise _Bad(f"{what} is not an object")
    if not _names(cls).issuperset(d):
        raise _Bad(f"{what} has unknown field {sorted(set(d) - _names(cls))[0]!r}")
    return d


_SHA = re.compile(r"[0-9a-f]{64}")
_XXH = re.compile(r"[0-9a-f]{16}")
_HEX = re.compile(r"(?:[0-9a-f]{2})*")


def _file(d: Any, what: str, name: str | None) -> FileEntry:
    d = _fields(d, FileEntry, what)
    e = FileEntry(_str(d, "file"), _int(d, "size"), _str(d, "sha256", _SHA))
    if name is not None and e.file != name:
        raise _Bad(f"{what}.file is {e.file[:80]!r}; a pack's is always {name}")
    return e


def _check(raw: dict[str, Any]) -> Manifest:
    raw = _fields(raw, Manifest, "the manifest")
    n_layer = _int(raw, "n_layer", 1, MAX_LAYERS)
    n_expert = _int(raw, "n_expert", 2, MAX_EXPERTS)
    n_used = _int(raw, "n_expert_used", 1, n_expert)
    alignment = _int(raw, "alignment", 1, 1 << 30)
    if not is_power_of_two(alignment):
        raise _Bad(f"alignment {alignment} is not a power of two")
    if raw.get("part_alignment", PART_ALIGNMENT) != PART_ALIGNMENT:
        raise _Bad(f"part_alignment is {raw['part_alignment']!r}, expected {PART_ALIGNMENT}")
    source = _file(raw["source"], "source", None)
    core = _file(raw["core"], "core", CORE_FILE)
    header = _file(raw["header"], "header", HEADER_FILE)
    data_offset = _int(raw, "data_offset")
    if data_offset != header.size:
        raise _Bad(f"data_offset {data_offset} differs from the header's size {header.size}")
    tail_hex = _str(raw, "tail_hex", _HEX) if "tail_hex" in raw else ""
    if len(tail_hex) > 2 << 20:
        raise _Bad("tail_hex is too long")
    if not isinstance(raw["tensors"], list) or not isinstance(raw["leaves"], list):
        raise _Bad("tensors and leaves must be lists")
    if len(raw["tensors"]) > 1 << 16:
        raise _Bad(f"{len(raw['tensors'])} tensors")

    tensors: list[TensorEntry] = []
    expert_tensors: dict[int, list[TensorEntry]] = {}
    names: set[str] = set()
    end = data_offset
    core_bytes = expert_bytes = 0
    for i, td in enumerate(raw["tensors"]):
        td = _fields(td, TensorEntry, f"tensors[{i}]")
        shape = td["shape"]
        if not isinstance(shape, list) or len(shape) > 4 or any(type(x) is not int or x < 0 for x in shape):
            raise _Bad(f"tensors[{i}].shape is {str(shape)[:80]}")
        t = TensorEntry(_str(td, "name"), _str(td, "type"), _int(td, "ggml_type", 0, 1 << 16), list(shape),
                        _int(td, "offset"), _int(td, "nbytes"), _str(td, "where"),
                        None if td.get("core_offset") is None else _int(td, "core_offset"),
                        _str(td, "pad_hex", _HEX) if "pad_hex" in td else "")
        if t.name in names or not t.name or len(t.name.encode()) >= 64:
            raise _Bad(f"tensor name {t.name[:80]!r} is empty, too long or repeated")
        names.add(t.name)
        try:
            nbytes = tensor_nbytes(t.ggml_type, tuple(t.shape))
        except SmoeError as e:
            raise _Bad(f"tensor {t.name}: {e}") from None
        if nbytes != t.nbytes or t.type != GGMLQuantizationType(t.ggml_type).name:
            raise _Bad(f"tensor {t.name} ({t.type[:16]}, {t.nbytes} bytes) does not match its ggml type and shape")
        if t.offset < end or (t.pad_hex and len(t.pad_hex) // 2 != t.offset - end):
            raise _Bad(f"tensor {t.name} at offset {t.offset} overlaps the one before or its padding is wrong")
        end = t.offset + t.nbytes
        if end > source.size:
            raise _Bad(f"tensor {t.name} ends at {end}, beyond the source's {source.size} bytes")
        if t.where == "core":
            if t.core_offset is None or t.core_offset + t.nbytes > core.size:
                raise _Bad(f"core tensor {t.name} has no place in {CORE_FILE} (core_offset {t.core_offset})")
            core_bytes += t.nbytes
        elif t.where == "leaves":
            parsed = archs.parse_expert_tensor(t.name)
            if parsed is None or parsed[0] >= n_layer or t.core_offset is not None:
                raise _Bad(f"tensor {t.name} is not a routed-expert tensor of one of {n_layer} layers")
            if not t.shape or t.shape[-1] != n_expert:
                raise _Bad(f"expert tensor {t.name} has shape {t.shape}, expected outermost dim {n_expert}")
            expert_tensors.setdefault(parsed[0], []).append(t)
            expert_bytes += t.nbytes
        else:
            raise _Bad(f"tensor {t.name} is in {t.where[:20]!r}, expected core or leaves")
        tensors.append(t)
    if end + len(tail_hex) // 2 != source.size:
        raise _Bad(f"the tensors and tail make {end + len(tail_hex) // 2} bytes, the source has {source.size}")
    if not expert_tensors:
        raise _Bad("no routed-expert tensor")
    if _int(raw, "core_bytes") != core_bytes or _int(raw, "expert_bytes") != expert_bytes:
        raise _Bad("core_bytes or expert_bytes do not add up")

    want = {(layer, e) for layer in expert_tensors for e in range(n_expert)}
    # per layer, what each leaf's parts must say: (tensor, part, stage, type, shape), and their length
    expect: dict[int, list[tuple[tuple[str, str, int, str, list[int]], TensorEntry]]] = {}
    for layer, ts in expert_tensors.items():
        for t in ts:
            _, part_name, stage = archs.parse_expert_tensor(t.name)  # type: ignore[misc]
            expect.setdefault(layer, []).append(((t.name, part_name, stage, t.type, t.shape[:-1]), t))
    leaves: list[LeafEntry] = []
    seen: set[tuple[int, int]] = set()
    for i, ld in enumerate(raw["leaves"]):
        ld = _fields(ld, LeafEntry, f"leaves[{i}]")
        layer, expert = _int(ld, "layer", 0, n_layer - 1), _int(ld, "expert", 0, n_expert - 1)
        label = f"leaf of layer {layer} expert {expert}"
        if (layer, expert) not in want:
            raise _Bad(f"{label}: layer {layer} has no routed experts")
        if (layer, expert) in seen:
            raise _Bad(f"{label} is listed twice")
        seen.add((layer, expert))
        file = _str(ld, "file")
        if file != leaf_file(layer, expert):
            raise _Bad(f"{label}: file {file[:80]!r}, a pack's is always {leaf_file(layer, expert)}")
        size = _int(ld, "size", 0, 1 << 44)
        if size % PART_ALIGNMENT:
            raise _Bad(f"{label}: size {size} is not a multiple of {PART_ALIGNMENT}")
        pds = ld["parts"]
        ts = expect[layer]
        if not isinstance(pds, list) or len(pds) != len(ts):
            raise _Bad(f"{label}: {len(pds) if isinstance(pds, list) else 'no'} parts, its layer has {len(ts)}")
        parts = []
        pos = 0
        for j, (pd, (said, t)) in enumerate(zip(pds, ts)):
            pd = _fields(pd, PartEntry, f"{label} part {j}")
            p = PartEntry(_str(pd, "part"), _str(pd, "tensor"), _int(pd, "stage", 0, 1), _int(pd, "offset"),
                          _int(pd, "length"), _str(pd, "type"), pd["shape"], _str(pd, "sha256", _SHA),
                          _str(pd, "xxh64", _XXH) if "xxh64" in pd else "")
            if (p.tensor, p.part, p.stage, p.type, p.shape) != said:
                raise _Bad(f"{label} part {j} ({str(p.part)[:20]}) does not match tensor {t.name}")
            if p.length != t.nbytes // n_expert or t.nbytes % n_expert:
                raise _Bad(f"{label} part {p.part}: length {p.length}, its tensor makes {t.nbytes // n_expert}")
            if p.offset % PART_ALIGNMENT or p.offset < pos or p.offset + p.length > size:
                raise _Bad(f"{label} part {p.part}: offset {p.offset} is misaligned, overlaps or is past the file")
            pos = p.offset + p.length
            parts.append(p)
        leaves.append(LeafEntry(layer, expert, file, size, parts))
    if seen != want:
        layer, expert = min(want - seen)
        raise _Bad(f"the leaf of layer {layer} expert {expert} is missing")
    return Manifest(
        source=source, arch=_str(raw, "arch"), n_layer=n_layer, n_expert=n_expert, n_expert_used=n_used,
        n_expert_shared=_int(raw, "n_expert_shared", 0, MAX_EXPERTS), alignment=alignment,
        data_offset=data_offset, core=core, header=header, core_bytes=core_bytes, expert_bytes=expert_bytes,
        tensors=tensors, leaves=leaves, tail_hex=tail_hex,
        source_id=_str(raw, "source_id", _SHA) if "source_id" in raw else "",
    )
