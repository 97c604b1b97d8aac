"""The pack's manifest: what `split` wrote, where every leaf part lives, and how to rebuild the source.

A pack is a directory::

    manifest.json        this file's contents (format, source identity, tensors, leaves)
    core.gguf            the dense core: every source key/value + every non-expert tensor
    source-header.bin    the source's exact header bytes (for a byte-identical merge)
    leaves/LLL/EEEE.leaf one file per leaf (layer LLL, expert EEEE); each part starts on a 4 KiB boundary
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import SmoeError

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
    format: str = FORMAT
    version: int = FORMAT_VERSION
    part_alignment: int = PART_ALIGNMENT
    _index: dict[tuple[int, int], LeafEntry] = field(default_factory=dict, repr=False, compare=False)

    def leaf(self, layer: int, expert: int) -> LeafEntry:
        if not self._index:
            self._index = {(lf.layer, lf.expert): lf for lf in self.leaves}
        return self._index[(layer, expert)]

    @property
    def min_budget(self) -> int:
        per_layer: dict[int, int] = {}
        for lf in self.leaves:
            per_layer[lf.layer] = max(per_layer.get(lf.layer, 0), lf.nbytes)
        return max(per_layer.values(), default=0) * self.n_expert_used

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("_index")
        return json.dumps(d, indent=1)


def save(manifest: Manifest, directory: Path) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, directory / MANIFEST)


def load(pack: str | os.PathLike[str]) -> Manifest:
    d = Path(pack)
    path = d / MANIFEST
    if not d.is_dir():
        raise SmoeError(f"{d}: not a pack directory (run `smoe-gguf split MODEL -o {d}` first)")
    if not path.is_file():
        raise SmoeError(f"{d}: not a pack ({MANIFEST} missing)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SmoeError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise SmoeError(f"{path}: not a smoe-gguf manifest")
    if raw.get("version") != FORMAT_VERSION:
        raise SmoeError(
            f"{path}: pack format version {raw.get('version')}, this smoe-gguf reads {FORMAT_VERSION}: split again"
        )
    try:
        raw["source"] = FileEntry(**raw["source"])
        raw["core"] = FileEntry(**raw["core"])
        raw["header"] = FileEntry(**raw["header"])
        raw["tensors"] = [TensorEntry(**t) for t in raw["tensors"]]
        raw["leaves"] = [
            LeafEntry(**{**lf, "parts": [PartEntry(**p) for p in lf["parts"]]}) for lf in raw["leaves"]
        ]
        return Manifest(**raw)
    except (KeyError, TypeError) as e:
        raise SmoeError(f"{path}: malformed manifest ({e})") from None
