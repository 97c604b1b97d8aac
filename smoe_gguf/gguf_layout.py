"""Byte-exact reading of a GGUF file's layout: header, key/values, tensor infos, data offsets.

A small reader of its own (rather than gguf.GGUFReader) because the pack needs the exact byte
span of every key/value and of the tensor-info block, reads only the header (and, on request, a
few small tensors' values: :func:`read_values`), and must turn every malformed or truncated file
into one clear message.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from .errors import SmoeError
from .safeio import open_regular

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


# Limits: what llama.cpp accepts (GGML_MAX_DIMS, GGML_MAX_NAME) and caps far above any real model
# that keep a hostile header from taking gigabytes or minutes to read.
MAX_DIMS = 4
MAX_NAME = 64  # GGML_MAX_NAME, including the terminating NUL
MAX_TENSORS = 1 << 16
MAX_KVS = 1 << 16
MAX_ARRAY = 1 << 23
MAX_ALIGNMENT = 1 << 30
INT_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})  # GGUF integer value types (not bool)
_MIN_WIDTH = {**{t: struct.calcsize(f) for t, f in _SCALAR.items()}, T_STRING: 8}


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


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class _Reader:
    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size

    def bad(self, what: str) -> SmoeError:
        return SmoeError(f"{self.path}: corrupt GGUF header ({what})")

    def left(self) -> int:
        return self.size - self.f.tell()

    def take(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise SmoeError(f"{self.path}: truncated GGUF header (file ends at byte {self.size})")
        return b

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > self.left():
            raise self.bad(f"string of {n} bytes at byte {self.f.tell() - 8}, beyond the end of the file")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == T_STRING:
            return self.string()
        if vtype == T_ARRAY:
            itype = self.unpack("<I")
            n = self.unpack("<Q")
            if itype == T_ARRAY:
                raise self.bad(f"key {shown(key)} is an array of arrays, which GGUF readers do not accept")
            if itype not in _MIN_WIDTH:
                raise self.bad(f"key {shown(key)} is an array of value type {itype}")
            if n > MAX_ARRAY or n * _MIN_WIDTH[itype] > self.left():
                raise self.bad(f"key {shown(key)} is an array of {n} items")
            if itype in _SCALAR:
                fmt = _SCALAR[itype]
                width = struct.calcsize(fmt)
                return list(struct.unpack(f"<{n}{fmt[1]}", self.take(n * width)))
            return [self.string() for _ in range(n)]
        raise self.bad(f"key {shown(key)} has value type {vtype}")


def quick_identity(path: str | os.PathLike[str]) -> str:
    """A GGUF file's identity without hashing gigabytes: the sha256 of its size and its first MiB
    (header, metadata and tensor table: what a different model cannot share). Profiles are keyed
    by it, and a pack records its source's, so that what was learnt on the one serves the other."""
    fd = open_regular(Path(path))
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(1 << 20)
    return hashlib.sha256(str(size).encode() + b"\0" + head).hexdigest()


def read_layout(path: str | os.PathLike[str]) -> GGUFLayout:
    """Parse the header of a GGUF file and check what llama.cpp's reader checks: unique keys and
    tensor names, a power-of-two ``general.alignment``, tensors of at most 4 known-type dims laid
    out back to back in order, each padded to the alignment, all inside the file."""
    p = Path(path)
    fd = open_regular(p)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            return _parse(f, p, size)
        except OSError as e:
            raise SmoeError(f"{p}: cannot read: {e.strerror}") from None


def _parse(f: BinaryIO, p: Path, size: int) -> GGUFLayout:
    r = _Reader(f, p, size)
    if f.read(4) != GGUF_MAGIC:
        raise SmoeError(f"{p}: not a GGUF file (bad magic)")
    version = r.unpack("<I")
    if version not in (2, 3):
        raise SmoeError(f"{p}: unsupported GGUF version {version}")
    n_tensors = r.unpack("<Q")
    n_kv = r.unpack("<Q")
    if n_tensors > MAX_TENSORS:
        raise r.bad(f"{n_tensors} tensors; at most {MAX_TENSORS} are accepted")
    if n_kv > MAX_KVS:
        raise r.bad(f"{n_kv} key/values; at most {MAX_KVS} are accepted")
    if n_tensors * 24 + n_kv * 12 > r.left():
        raise SmoeError(f"{p}: truncated GGUF header ({n_kv} key/values and {n_tensors} tensor infos "
                        f"cannot fit in the file's {size} bytes)")
    kvs: dict[str, KV] = {}
    for _ in range(n_kv):
        start = f.tell()
        key = r.string()
        if not key:
            raise r.bad("an empty key")
        if key in kvs:
            raise r.bad(f"duplicate key {shown(key)}")
        vtype = r.unpack("<I")
        val = r.value(vtype, key)
        end = f.tell()
        f.seek(start)
        kvs[key] = KV(key, vtype, val, f.read(end - start))
    kv_end = f.tell()
    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in kvs:
        kv = kvs["general.alignment"]
        if kv.vtype != T_UINT32:
            raise r.bad(f"general.alignment must be a uint32, not {type_name(kv.vtype)}")
        if not is_power_of_two(kv.value) or kv.value > MAX_ALIGNMENT:
            raise r.bad(f"general.alignment {kv.value} is not a power of two")
        alignment = kv.value
    raw_infos = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = r.string()
        if len(name.encode("utf-8")) >= MAX_NAME:
            raise r.bad(f"tensor name {shown(name)} is longer than {MAX_NAME - 1} bytes")
        if name in names:
            raise r.bad(f"duplicate tensor name {shown(name)}")
        names.add(name)
        n_dims = r.unpack("<I")
        if n_dims > MAX_DIMS:
            raise r.bad(f"tensor {name} has {n_dims} dims")
        shape = tuple(r.unpack("<q") for _ in range(n_dims))
        count = 1
        for d in shape:
            if d < 0:
                raise r.bad(f"tensor {name} has a negative dimension {d}")
            count *= d
        if count >= 1 << 63:
            raise r.bad(f"tensor {name} of shape {list(shape)} has too many elements")
        ggml_type = r.unpack("<I")
        rel = r.unpack("<Q")
        raw_infos.append((name, ggml_type, shape, rel))
    data_offset = align_up(f.tell(), alignment)
    tensors = []
    expected = 0
    for name, ggml_type, shape, rel in raw_infos:
        try:
            nbytes = tensor_nbytes(ggml_type, shape)
        except SmoeError as e:
            raise r.bad(f"tensor {name}: {e}") from None
        if rel != expected:
            raise r.bad(f"tensor {name} has data offset {rel}, expected {expected}: "
                        "tensors must be back to back, in order, each padded to the alignment")
        expected = align_up(rel + nbytes, alignment)
        t = TensorInfo(name, ggml_type, shape, rel, data_offset + rel, nbytes)
        if t.offset + nbytes > size:
            raise SmoeError(
                f"{p}: truncated GGUF (tensor {name} ends at byte {t.offset + nbytes}, file has {size})"
            )
        tensors.append(t)
    return GGUFLayout(p, size, version, kvs, tensors, alignment, kv_end, data_offset)


def read_values(layout: GGUFLayout, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The named tensors' values, dequantized to float32 in numpy's order (outermost dimension
    first), read with one ``pread`` each: into this process's memory, so that using them later
    faults nothing in from the disk."""
    out: dict[str, np.ndarray] = {}
    fd = open_regular(layout.path)
    try:
        for name in names:
            t = layout.tensor(name)
            raw = os.pread(fd, t.nbytes, t.offset)
            if len(raw) != t.nbytes:
                raise SmoeError(f"{layout.path}: truncated GGUF (tensor {name})")
            rows = math.prod(t.shape[1:])
            data = np.frombuffer(raw, np.uint8).reshape(rows, t.nbytes // max(1, rows))
            values = np.array(dequantize(data, GGMLQuantizationType(t.ggml_type)), np.float32)
            out[name] = values.reshape(tuple(reversed(t.shape)))
    except OSError as e:
        raise SmoeError(f"{layout.path}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    return out


_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
               8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}


def shown(text: str, limit: int = 60) -> str:
    """A key or name from a file, quoted and cut short for a message."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def type_name(vtype: int) -> str:
    """The GGUF name of a value type ("uint32", "string", ...)."""
    return _TYPE_NAMES.get(vtype, f"type {vtype}")


def int_value(layout: GGUFLayout, key: str, lo: int, hi: int, default: int | None = None) -> int:
    """The integer value of ``key``, checked to be an integer type within [lo, hi]; ``default``
    if absent (None: the key is required)."""
    kv = layout.kvs.get(key)
    if kv is None:
        if default is None:
            raise SmoeError(f"{layout.path}: key {shown(key)} is missing")
        return default
    if kv.vtype not in INT_TYPES:
        raise SmoeError(f"{layout.path}: key {shown(key)} is a {type_name(kv.vtype)}, not an integer")
    if not lo <= kv.value <= hi:
        raise SmoeError(f"{layout.path}: key {shown(key)} is {kv.value}, outside [{lo}, {hi}]")
    return int(kv.value)


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
