"""Byte-exact reading of a GGUF file's layout: header, key/values, tensor infos, data offsets.

A small reader of its own (rather than gguf.GGUFReader) because the pack needs the exact byte
span of every key/value and of the tensor-info block, reads only the header (never the data),
and must turn every malformed or truncated file into one clear message.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import SmoeError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value types -> struct format of one scalar.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
T_STRING = 8
T_ARRAY = 9
T_UINT16 = 2
T_UINT32 = 4
T_INT32 = 5


@dataclass(frozen=True)
class KV:
    key: str
    vtype: int
    value: Any
    raw: bytes  # the whole encoded key/value, exactly as in the file


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # ggml order: ne[0] (innermost) first
    rel_offset: int  # offset inside the data section, as written in the file
    offset: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.ggml_type).name


@dataclass
class GGUFLayout:
    path: Path
    file_size: int
    version: int
    kvs: dict[str, KV]
    tensors: list[TensorInfo]
    alignment: int
    kv_end: int  # offset just after the last key/value (start of tensor infos)
    data_offset: int  # start of the tensor data section
    _by_name: dict[str, TensorInfo] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {t.name: t for t in self.tensors}

    def value(self, key: str, default: Any = None) -> Any:
        kv = self.kvs.get(key)
        return default if kv is None else kv.value

    def tensor(self, name: str) -> TensorInfo:
        return self._by_name[name]

    @property
    def architecture(self) -> str:
        return str(self.value("general.architecture", "?"))


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise SmoeError(f"unknown ggml tensor type {ggml_type}") from None
    n = 1
    for d in shape:
        n *= d
    if shape and shape[0] % block:
        raise SmoeError(f"tensor row of {shape[0]} elements is not a multiple of its block size {block}")
    return n // block * size


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


class _Reader:
    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size

    def take(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise SmoeError(f"{self.path}: truncated GGUF header (file ends at byte {self.size})")
        return b

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > self.size:
            raise SmoeError(f"{self.path}: corrupt GGUF header (string of {n} bytes)")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == T_STRING:
            return self.string()
        if vtype == T_ARRAY:
            itype = self.unpack("<I")
            n = self.unpack("<Q")
            if n > self.size:
                raise SmoeError(f"{self.path}: corrupt GGUF header (array of {n} items)")
            if itype in _SCALAR:
                fmt = _SCALAR[itype]
                width = struct.calcsize(fmt)
                return list(struct.unpack(f"<{n}{fmt[1]}", self.take(n * width)))
            return [self.value(itype) for _ in range(n)]
        raise SmoeError(f"{self.path}: corrupt GGUF header (value type {vtype})")


def read_layout(path: str | os.PathLike[str]) -> GGUFLayout:
    """Parse the header of a GGUF file and check that every tensor's data lies inside the file."""
    p = Path(path)
    if not p.is_file():
        raise SmoeError(f"{p}: no such file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        r = _Reader(f, p, size)
        if f.read(4) != GGUF_MAGIC:
            raise SmoeError(f"{p}: not a GGUF file (bad magic)")
        version = r.unpack("<I")
        if version not in (2, 3):
            raise SmoeError(f"{p}: unsupported GGUF version {version}")
        n_tensors = r.unpack("<Q")
        n_kv = r.unpack("<Q")
        kvs: dict[str, KV] = {}
        for _ in range(n_kv):
            start = f.tell()
            key = r.string()
            vtype = r.unpack("<I")
            val = r.value(vtype)
            end = f.tell()
            f.seek(start)
            kvs[key] = KV(key, vtype, val, f.read(end - start))
        kv_end = f.tell()
        alignment = int(kvs["general.alignment"].value) if "general.alignment" in kvs else DEFAULT_ALIGNMENT
        raw_infos = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.unpack("<I")
            if n_dims > 4:
                raise SmoeError(f"{p}: corrupt GGUF header (tensor {name} has {n_dims} dims)")
            shape = tuple(r.unpack("<Q") for _ in range(n_dims))
            ggml_type = r.unpack("<I")
            rel = r.unpack("<Q")
            raw_infos.append((name, ggml_type, shape, rel))
        data_offset = align_up(f.tell(), alignment)
    tensors = []
    for name, ggml_type, shape, rel in raw_infos:
        nbytes = tensor_nbytes(ggml_type, shape)
        t = TensorInfo(name, ggml_type, shape, rel, data_offset + rel, nbytes)
        if t.offset + nbytes > size:
            raise SmoeError(
                f"{p}: truncated GGUF (tensor {name} ends at byte {t.offset + nbytes}, file has {size})"
            )
        tensors.append(t)
    return GGUFLayout(p, size, version, kvs, tensors, alignment, kv_end, data_offset)


def encode_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def encode_kv(key: str, vtype: int, value: int | str) -> bytes:
    """Encode one scalar or string key/value in GGUF form."""
    body = encode_string(value) if vtype == T_STRING else struct.pack(_SCALAR[vtype], value)  # type: ignore[arg-type]
    return encode_string(key) + struct.pack("<I", vtype) + body


def encode_tensor_info(name: str, ggml_type: int, shape: tuple[int, ...], rel_offset: int) -> bytes:
    out = encode_string(name) + struct.pack("<I", len(shape))
    out += b"".join(struct.pack("<Q", d) for d in shape)
    return out + struct.pack("<IQ", ggml_type, rel_offset)


def write_header(
    f: BinaryIO, version: int, kv_blobs: list[bytes], infos: list[bytes], alignment: int
) -> int:
    """Write a GGUF header from encoded parts, pad to the alignment, return the data offset."""
    f.write(GGUF_MAGIC + struct.pack("<IQQ", version, len(infos), len(kv_blobs)))
    for b in kv_blobs:
        f.write(b)
    for b in infos:
        f.write(b)
    pos = f.tell()
    data_offset = align_up(pos, alignment)
    f.write(b"\0" * (data_offset - pos))
    return data_offset
