"""ctypes over ggml internals: the ONE module that knows ggml's struct layouts.

llama-cpp-python exposes llama.h, not the ggml-backend internals the X-Slot needs (a buffer
type of our own, the fields of ``struct ggml_tensor``). Those are declared here by hand from
the headers of llama-cpp-python 0.3.36 (vendored llama.cpp, ggml 0.25.3):

- ``ggml/include/ggml.h``             struct ggml_tensor, struct ggml_init_params
- ``ggml/src/ggml-backend-impl.h``    struct ggml_backend_buffer_type_i / _type / _buffer_i / _buffer
- ``ggml/include/ggml-backend.h``     the public functions bound below

Because these are internals, the llama-cpp-python version is pinned (checked at import) and
:func:`check_layout` verifies every offset we rely on against the loaded library at run time.
"""

from __future__ import annotations

import ctypes
import sys
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_int,
    c_int32,
    c_int64,
    c_size_t,
    c_uint8,
    c_void_p,
)
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import SmoeError

PINNED_LLAMA_CPP_VERSION = "0.3.36"


def _import_llama_cpp() -> ModuleType:
    try:
        import llama_cpp
    except Exception as e:  # ImportError, or OSError when the shared library fails to load
        raise SmoeError(
            f"cannot import llama_cpp ({e}); install llama-cpp-python=={PINNED_LLAMA_CPP_VERSION}"
        ) from e
    version = getattr(llama_cpp, "__version__", "?")
    if version != PINNED_LLAMA_CPP_VERSION:
        raise SmoeError(
            f"llama-cpp-python {version} is installed but smoe-gguf relies on ggml internals of exactly "
            f"{PINNED_LLAMA_CPP_VERSION}; install llama-cpp-python=={PINNED_LLAMA_CPP_VERSION}"
        )
    return llama_cpp


llama_cpp = _import_llama_cpp()

# --------------------------------------------------------------------------------------------
# Constants (ggml.h, ggml-backend.h)

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_MAX_N_THREADS = 512
GGML_OBJECT_SIZE = 32  # sizeof(struct ggml_object) in ggml.c: offs, size, next, type, padding[4]

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_I32 = 26

GGML_STATUS_SUCCESS = 0
GGML_STATUS_FAILED = -1
GGML_TENSOR_FLAG_INPUT = 1

GGML_BACKEND_DEVICE_TYPE_CPU = 0
GGML_BACKEND_BUFFER_USAGE_ANY = 0
GGML_BACKEND_BUFFER_USAGE_WEIGHTS = 1
GGML_BACKEND_BUFFER_USAGE_COMPUTE = 2

# --------------------------------------------------------------------------------------------
# Structures


class GgmlTensor(Structure):
    """``struct ggml_tensor`` (ggml.h); sizeof 336 on LP64."""

    _fields_ = [
        ("type", c_int),
        ("buffer", c_void_p),
        ("ne", c_int64 * GGML_MAX_DIMS),
        ("nb", c_size_t * GGML_MAX_DIMS),
        ("op", c_int),
        ("op_params", c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", c_int32),
        ("src", c_void_p * GGML_MAX_SRC),
        ("view_src", c_void_p),
        ("view_offs", c_size_t),
        ("data", c_void_p),
        ("name", c_char * GGML_MAX_NAME),
        ("extra", c_void_p),
        ("padding", c_char * 8),
    ]


# Offsets used on hot paths (read with ctypes.string_at / from_address, no Structure built).
TENSOR_NAME_OFFSET: int = GgmlTensor.name.offset  # type: ignore[attr-defined]
TENSOR_DATA_OFFSET: int = GgmlTensor.data.offset  # type: ignore[attr-defined]


class GgmlInitParams(Structure):
    _fields_ = [("mem_size", c_size_t), ("mem_buffer", c_void_p), ("no_alloc", c_bool)]


# struct ggml_backend_buffer_type_i. Callbacks that return pointers are declared c_void_p and
# must return a plain int address (returning a ctypes object leaks and warns).
BUFT_GET_NAME = CFUNCTYPE(c_void_p, c_void_p)  # const char * (*)(buft)
BUFT_ALLOC_BUFFER = CFUNCTYPE(c_void_p, c_void_p, c_size_t)  # buffer (*)(buft, size)
BUFT_GET_ALIGNMENT = CFUNCTYPE(c_size_t, c_void_p)
BUFT_GET_MAX_SIZE = CFUNCTYPE(c_size_t, c_void_p)
BUFT_GET_ALLOC_SIZE = CFUNCTYPE(c_size_t, c_void_p, c_void_p)  # (buft, const tensor *)
BUFT_IS_HOST = CFUNCTYPE(c_bool, c_void_p)


class GgmlBackendBufferTypeI(Structure):
    _fields_ = [
        ("get_name", BUFT_GET_NAME),
        ("alloc_buffer", BUFT_ALLOC_BUFFER),
        ("get_alignment", BUFT_GET_ALIGNMENT),
        ("get_max_size", BUFT_GET_MAX_SIZE),
        ("get_alloc_size", BUFT_GET_ALLOC_SIZE),
        ("is_host", BUFT_IS_HOST),
    ]


class GgmlBackendBufferType(Structure):
    _fields_ = [("iface", GgmlBackendBufferTypeI), ("device", c_void_p), ("context", c_void_p)]


# struct ggml_backend_buffer_i
BUF_FREE_BUFFER = CFUNCTYPE(None, c_void_p)
BUF_GET_BASE = CFUNCTYPE(c_void_p, c_void_p)
BUF_INIT_TENSOR = CFUNCTYPE(c_int, c_void_p, c_void_p)  # enum ggml_status (*)(buffer, tensor)
BUF_MEMSET_TENSOR = CFUNCTYPE(None, c_void_p, c_void_p, c_uint8, c_size_t, c_size_t)
BUF_SET_TENSOR = CFUNCTYPE(None, c_void_p, c_void_p, c_void_p, c_size_t, c_size_t)
BUF_GET_TENSOR = CFUNCTYPE(None, c_void_p, c_void_p, c_void_p, c_size_t, c_size_t)
BUF_SET_TENSOR_2D = CFUNCTYPE(
    None, c_void_p, c_void_p, c_void_p, c_size_t, c_size_t, c_size_t, c_size_t, c_size_t
)
BUF_GET_TENSOR_2D = CFUNCTYPE(
    None, c_void_p, c_void_p, c_void_p, c_size_t, c_size_t, c_size_t, c_size_t, c_size_t
)
BUF_CPY_TENSOR = CFUNCTYPE(c_bool, c_void_p, c_void_p, c_void_p)
BUF_CLEAR = CFUNCTYPE(None, c_void_p, c_uint8)
BUF_RESET = CFUNCTYPE(None, c_void_p)


class GgmlBackendBufferI(Structure):
    _fields_ = [
        ("free_buffer", BUF_FREE_BUFFER),
        ("get_base", BUF_GET_BASE),
        ("init_tensor", BUF_INIT_TENSOR),
        ("memset_tensor", BUF_MEMSET_TENSOR),
        ("set_tensor", BUF_SET_TENSOR),
        ("get_tensor", BUF_GET_TENSOR),
        ("set_tensor_2d", BUF_SET_TENSOR_2D),
        ("get_tensor_2d", BUF_GET_TENSOR_2D),
        ("cpy_tensor", BUF_CPY_TENSOR),
        ("clear", BUF_CLEAR),
        ("reset", BUF_RESET),
    ]


BUFFER_IFACE_SLOTS = 11  # function pointers in ggml_backend_buffer_i (ggml-backend-impl.h)
BUFT_IFACE_SLOTS = 6  # function pointers in ggml_backend_buffer_type_i


class GgmlBackendBuffer(Structure):
    _fields_ = [
        ("iface", GgmlBackendBufferI),
        ("buft", c_void_p),
        ("context", c_void_p),
        ("size", c_size_t),
        ("usage", c_int),
    ]


class LlamaTensorBuftOverride(Structure):
    """``struct llama_model_tensor_buft_override`` (llama.h); the binding types the field as c_void_p."""

    _fields_ = [("pattern", c_char_p), ("buft", c_void_p)]


class GgmlThreadpoolParams(Structure):
    """``struct ggml_threadpool_params`` (ggml.h): a compute thread pool's size, and how long its
    idle threads poll for the next graph before they sleep (``poll``: 0 none, 100 the most)."""

    _fields_ = [
        ("cpumask", c_bool * GGML_MAX_N_THREADS),
        ("n_threads", c_int),
        ("prio", c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", c_bool),
        ("paused", c_bool),
    ]


# The eval callback type of llama_context_params.cb_eval (re-exported so callers use one name).
EvalCallback = llama_cpp.ggml_backend_sched_eval_callback

# --------------------------------------------------------------------------------------------
# Libraries and functions

LIB_DIR = Path(str(llama_cpp.__file__)).resolve().parent / "lib"


def _load(name: str) -> ctypes.CDLL:
    """``lib<name>`` from llama-cpp-python's library folder: the file llama.cpp's own libraries
    link to (``.so.0``, ``.0.dylib``) where it is there. The wheel holds each library as separate
    copies under its names, and a second copy in the process has globals of its own: ggml's
    tables that its CPU init fills, its backend registry."""
    suffixes = (".0.dylib", ".dylib", ".so") if sys.platform == "darwin" else (".so.0", ".so")
    paths = [LIB_DIR / f"lib{name}{suffix}" for suffix in suffixes]
    path = next((p for p in paths if p.exists()), paths[0])
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise SmoeError(f"cannot load {path} ({e}); reinstall llama-cpp-python=={PINNED_LLAMA_CPP_VERSION}") from e


libggml_base = _load("ggml-base")
libggml = _load("ggml")
libggml_cpu = _load("ggml-cpu")
libc = ctypes.CDLL(None, use_errno=True)


def _fn(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Any:
    try:
        f = getattr(lib, name)
    except AttributeError as e:
        raise SmoeError(f"{name} is missing from {lib._name}; the llama-cpp-python build is not the expected one") from e
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


_B = libggml_base
# ggml.h
ggml_init = _fn(_B, "ggml_init", c_void_p, GgmlInitParams)
ggml_free = _fn(_B, "ggml_free", None, c_void_p)
ggml_new_tensor_3d = _fn(_B, "ggml_new_tensor_3d", c_void_p, c_void_p, c_int, c_int64, c_int64, c_int64)
ggml_view_2d = _fn(_B, "ggml_view_2d", c_void_p, c_void_p, c_void_p, c_int64, c_int64, c_size_t, c_size_t)
ggml_set_name = _fn(_B, "ggml_set_name", c_void_p, c_void_p, c_char_p)
ggml_get_name = _fn(_B, "ggml_get_name", c_char_p, c_void_p)
ggml_get_data = _fn(_B, "ggml_get_data", c_void_p, c_void_p)
ggml_set_input = _fn(_B, "ggml_set_input", None, c_void_p)
ggml_nbytes = _fn(_B, "ggml_nbytes", c_size_t, c_void_p)
ggml_nrows = _fn(_B, "ggml_nrows", c_int64, c_void_p)
ggml_n_dims = _fn(_B, "ggml_n_dims", c_int, c_void_p)
ggml_op_name = _fn(_B, "ggml_op_name", c_char_p, c_int)
ggml_type_size = _fn(_B, "ggml_type_size", c_size_t, c_int)
ggml_tensor_overhead = _fn(_B, "ggml_tensor_overhead", c_size_t)
# ggml-backend.h / ggml-backend-impl.h
ggml_backend_buffer_init = _fn(
    _B, "ggml_backend_buffer_init", c_void_p, c_void_p, GgmlBackendBufferI, c_void_p, c_size_t
)
ggml_backend_buffer_free = _fn(_B, "ggml_backend_buffer_free", None, c_void_p)
ggml_backend_buffer_get_base = _fn(_B, "ggml_backend_buffer_get_base", c_void_p, c_void_p)
ggml_backend_buffer_get_size = _fn(_B, "ggml_backend_buffer_get_size", c_size_t, c_void_p)
ggml_backend_buffer_get_type = _fn(_B, "ggml_backend_buffer_get_type", c_void_p, c_void_p)
ggml_backend_buffer_is_host = _fn(_B, "ggml_backend_buffer_is_host", c_bool, c_void_p)
ggml_backend_buffer_clear = _fn(_B, "ggml_backend_buffer_clear", None, c_void_p, c_uint8)
ggml_backend_buffer_set_usage = _fn(_B, "ggml_backend_buffer_set_usage", None, c_void_p, c_int)
ggml_backend_buffer_get_usage = _fn(_B, "ggml_backend_buffer_get_usage", c_int, c_void_p)
ggml_backend_buft_name = _fn(_B, "ggml_backend_buft_name", c_char_p, c_void_p)
ggml_backend_buft_alloc_buffer = _fn(_B, "ggml_backend_buft_alloc_buffer", c_void_p, c_void_p, c_size_t)
ggml_backend_buft_get_alignment = _fn(_B, "ggml_backend_buft_get_alignment", c_size_t, c_void_p)
ggml_backend_buft_get_max_size = _fn(_B, "ggml_backend_buft_get_max_size", c_size_t, c_void_p)
ggml_backend_buft_is_host = _fn(_B, "ggml_backend_buft_is_host", c_bool, c_void_p)
ggml_backend_buft_get_device = _fn(_B, "ggml_backend_buft_get_device", c_void_p, c_void_p)
ggml_backend_cpu_buffer_type = _fn(_B, "ggml_backend_cpu_buffer_type", c_void_p)
ggml_backend_tensor_alloc = _fn(_B, "ggml_backend_tensor_alloc", c_int, c_void_p, c_void_p, c_void_p)
ggml_backend_tensor_set = _fn(_B, "ggml_backend_tensor_set", None, c_void_p, c_void_p, c_size_t, c_size_t)
ggml_backend_tensor_get = _fn(_B, "ggml_backend_tensor_get", None, c_void_p, c_void_p, c_size_t, c_size_t)
ggml_backend_tensor_memset = _fn(_B, "ggml_backend_tensor_memset", None, c_void_p, c_uint8, c_size_t, c_size_t)
ggml_backend_dev_name = _fn(_B, "ggml_backend_dev_name", c_char_p, c_void_p)
ggml_backend_dev_type = _fn(_B, "ggml_backend_dev_type", c_int, c_void_p)
# registry (libggml.so)
ggml_backend_dev_by_type = _fn(libggml, "ggml_backend_dev_by_type", c_void_p, c_int)
# compute thread pools (ggml.h, ggml-cpu.h)
ggml_threadpool_params_init = _fn(_B, "ggml_threadpool_params_init", None, POINTER(GgmlThreadpoolParams), c_int)
ggml_threadpool_params_match = _fn(_B, "ggml_threadpool_params_match", c_bool, POINTER(GgmlThreadpoolParams),
                                   POINTER(GgmlThreadpoolParams))
ggml_threadpool_new = _fn(libggml_cpu, "ggml_threadpool_new", c_void_p, POINTER(GgmlThreadpoolParams))
ggml_threadpool_free = _fn(libggml_cpu, "ggml_threadpool_free", None, c_void_p)
# llama.h (llama-cpp-python does not bind it): a context's pools for decode and for prompt batches
llama_attach_threadpool = _fn(llama_cpp.llama_cpp._lib, "llama_attach_threadpool", None, c_void_p, c_void_p, c_void_p)

# libc
libc_mmap = _fn(libc, "mmap", c_void_p, c_void_p, c_size_t, c_int, c_int, c_int, ctypes.c_long)
libc_munmap = _fn(libc, "munmap", c_int, c_void_p, c_size_t)
libc_mincore = _fn(libc, "mincore", c_int, c_void_p, c_size_t, POINTER(c_uint8))
libc_madvise = _fn(libc, "madvise", c_int, c_void_p, c_size_t, c_int)
MAP_FAILED = ctypes.c_void_p(-1).value


def cpu_device() -> int:
    dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if not dev:
        raise SmoeError("llama.cpp has no CPU backend device; the llama-cpp-python build is broken")
    return int(dev)


_PLAIN_CPU_BUFT: list[GgmlBackendBufferType] = []


def plain_cpu_buffer_type() -> int:
    """A buffer type that is llama.cpp's CPU one (its functions, device and context, copied) at an
    address of its own. llama.cpp's loader gives weights overridden to its own CPU buffer type the
    CPU's extra buffer types, which repack some quant types for the CPU's instructions; weights
    overridden to this one stay in the plain layout, the layout the X-Slot holds."""
    if not _PLAIN_CPU_BUFT:
        cpu = GgmlBackendBufferType.from_address(ggml_backend_cpu_buffer_type())
        _PLAIN_CPU_BUFT.append(GgmlBackendBufferType.from_buffer_copy(cpu))
    return ctypes.addressof(_PLAIN_CPU_BUFT[0])


def tensor_at(address: int) -> GgmlTensor:
    """A view of the ``struct ggml_tensor`` at ``address`` (no copy; valid while the tensor lives)."""
    return GgmlTensor.from_address(address)


# --------------------------------------------------------------------------------------------
# Run-time layout check


class LayoutError(SmoeError):
    pass


def _expect(what: str, ours: object, lib: object) -> None:
    if ours != lib:
        raise LayoutError(
            f"ggml ABI mismatch: {what}: our struct says {ours!r}, the library says {lib!r}; "
            f"smoe-gguf needs llama-cpp-python=={PINNED_LLAMA_CPP_VERSION}"
        )


def check_layout(
    tensor_struct: type[Structure] = GgmlTensor,
    buffer_struct: type[Structure] = GgmlBackendBuffer,
    buft_struct: type[Structure] = GgmlBackendBufferType,
) -> None:
    """Verify our ctypes layouts against the loaded ggml; raise :class:`LayoutError` on any mismatch.

    Every check compares a field read through *our* struct with the same value obtained through
    an exported ggml function (which uses the real layout), so a moved, added or removed field
    changes at least one comparison. The structs are parameters so a test can hand in a wrong one.
    """
    # struct ggml_tensor: size (overhead = object header + tensor)
    _expect("sizeof(ggml_tensor)", ctypes.sizeof(tensor_struct), ggml_tensor_overhead() - GGML_OBJECT_SIZE)

    cpu_buft = ggml_backend_cpu_buffer_type()
    cpu_buf = ggml_backend_buft_alloc_buffer(cpu_buft, 1 << 16)
    if not cpu_buf:
        raise LayoutError("ggml ABI check: cannot allocate a 64 KiB CPU buffer")
    params = GgmlInitParams(mem_size=16 * ggml_tensor_overhead(), mem_buffer=None, no_alloc=True)
    ctx = ggml_init(params)
    if not ctx:
        raise LayoutError("ggml ABI check: ggml_init failed")
    try:
        # --- ggml_tensor fields
        t = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, 7, 5, 3)
        ggml_set_name(t, b"smoe-abi-probe.weight")
        base = ggml_backend_buffer_get_base(cpu_buf)
        status = ggml_backend_tensor_alloc(cpu_buf, t, base + 4096)
        _expect("ggml_backend_tensor_alloc status", status, GGML_STATUS_SUCCESS)
        ggml_set_input(t)
        ours = tensor_struct.from_address(t)
        _expect("ggml_tensor.type", ours.type, GGML_TYPE_F16)
        _expect("ggml_tensor.ne", tuple(ours.ne), (7, 5, 3, 1))
        f16 = ggml_type_size(GGML_TYPE_F16)
        _expect("ggml_tensor.nb", tuple(ours.nb), (f16, 7 * f16, 35 * f16, 105 * f16))
        nbytes = ggml_type_size(ours.type)
        for i in range(GGML_MAX_DIMS):
            nbytes += (ours.ne[i] - 1) * ours.nb[i]
        _expect("nbytes from ggml_tensor.ne/nb", nbytes, ggml_nbytes(t))
        _expect("rows from ggml_tensor.ne", ours.ne[1] * ours.ne[2] * ours.ne[3], ggml_nrows(t))
        _expect("ggml_tensor.name", ours.name, ggml_get_name(t))
        _expect("ggml_tensor.data", ours.data, ggml_get_data(t))
        _expect("ggml_tensor.data", ours.data, base + 4096)
        _expect("ggml_tensor.buffer", ours.buffer, cpu_buf)
        _expect("ggml_tensor.flags", ours.flags, GGML_TENSOR_FLAG_INPUT)
        _expect("ggml_op_name(ggml_tensor.op) of a new tensor", ggml_op_name(ours.op), b"NONE")

        v = ggml_view_2d(ctx, t, 3, 2, 7 * f16, 5 * f16)
        ggml_set_name(v, b"smoe-abi-view")
        vo = tensor_struct.from_address(v)
        _expect("ggml_op_name(view.op)", ggml_op_name(vo.op), b"VIEW")
        _expect("view.src[0]", vo.src[0], t)
        _expect("view.view_src", vo.view_src, t)
        _expect("view.view_offs", vo.view_offs, 5 * f16)
        _expect("view.op_params[0] (offset)", vo.op_params[0], 5 * f16)
        _expect("view.name", vo.name, ggml_get_name(v))
        nbytes = ggml_type_size(vo.type)
        for i in range(GGML_MAX_DIMS):
            nbytes += (vo.ne[i] - 1) * vo.nb[i]
        _expect("view nbytes from ne/nb", nbytes, ggml_nbytes(v))
        # consecutive tensors of a no_alloc context are one overhead apart
        _expect("tensor stride in a ggml context", v - t, ggml_tensor_overhead())

        # --- ggml_backend_buffer_type: first the library reads a probe built with our struct
        # (a moved field is caught before any slot of ours is called), then we read the CPU one
        _check_probe_buft(buft_struct)
        bt = buft_struct.from_address(cpu_buft)
        _expect("buft.iface.get_name()", ctypes.string_at(bt.iface.get_name(cpu_buft)), ggml_backend_buft_name(cpu_buft))
        _expect("buft.iface.get_alignment()", bt.iface.get_alignment(cpu_buft), ggml_backend_buft_get_alignment(cpu_buft))
        _expect("buft.iface.is_host()", bool(bt.iface.is_host(cpu_buft)), bool(ggml_backend_buft_is_host(cpu_buft)))
        _expect("buft.device", bt.device, ggml_backend_buft_get_device(cpu_buft))

        # --- ggml_backend_buffer (CPU): fields after the iface prove the iface slot count
        ggml_backend_buffer_set_usage(cpu_buf, GGML_BACKEND_BUFFER_USAGE_COMPUTE)
        bo = buffer_struct.from_address(cpu_buf)
        _expect("buffer.buft", bo.buft, cpu_buft)
        _expect("buffer.size", bo.size, ggml_backend_buffer_get_size(cpu_buf))
        _expect("buffer.usage", bo.usage, ggml_backend_buffer_get_usage(cpu_buf))
        _expect("buffer.iface.get_base()", bo.iface.get_base(cpu_buf), base)
        # our declarations against the slot counts read from ggml-backend-impl.h
        _expect("function pointers before buffer.buft", buffer_struct.buft.offset, 8 * BUFFER_IFACE_SLOTS)  # type: ignore[attr-defined]
        _expect("function pointers before buft.device", buft_struct.device.offset, 8 * BUFT_IFACE_SLOTS)  # type: ignore[attr-defined]

        dev = cpu_device()
        _expect("type of the device ggml_backend_dev_by_type(CPU) returns", ggml_backend_dev_type(dev), GGML_BACKEND_DEVICE_TYPE_CPU)
        _check_threadpool_params()
    finally:
        ggml_free(ctx)
        ggml_backend_buffer_free(cpu_buf)



def _check_threadpool_params() -> None:
    """``struct ggml_threadpool_params``: the library fills ours (guarded: it must not write past
    it) and compares two through its own layout."""
    size = ctypes.sizeof(GgmlThreadpoolParams)
    guarded = (c_uint8 * (size + 64))(*([0xA5] * (size + 64)))
    ggml_threadpool_params_init(ctypes.cast(guarded, POINTER(GgmlThreadpoolParams)), 3)
    _expect("bytes ggml_threadpool_params_init writes past our struct", bytes(guarded[size:]), bytes([0xA5] * 64))
    a = GgmlThreadpoolParams.from_buffer_copy(bytes(guarded[:size]))
    _expect("ggml_threadpool_params.n_threads", a.n_threads, 3)
    _expect("ggml_threadpool_params.poll (ggml's default)", a.poll, 50)
    _expect("ggml_threadpool_params.paused", bool(a.paused), False)
    b = GgmlThreadpoolParams.from_buffer_copy(bytes(a))
    _expect("ggml_threadpool_params_match of a copy", bool(ggml_threadpool_params_match(a, b)), True)
    b.poll = 7
    _expect("ggml_threadpool_params_match after our poll changed", bool(ggml_threadpool_params_match(a, b)), False)
    b.poll, b.n_threads = a.poll, 4
    _expect("ggml_threadpool_params_match after our n_threads changed", bool(ggml_threadpool_params_match(a, b)), False)


_layout_checked = False


def ensure_layout() -> None:
    """:func:`check_layout` once per process (the X-Slot and the gate call it before first use)."""
    global _layout_checked
    if not _layout_checked:
        check_layout()
        _layout_checked = True


def _check_probe_buft(buft_struct: type[Structure]) -> None:
    """Build a buffer type through ``buft_struct`` and let the library read it back.

    The device field is checked first: with a wrong slot count it moves, and the function
    pointers read at the library's offsets would be garbage, so they are only called after it.
    """
    device, context = 0x5A5A0000, 0xA5A50000  # sentinels, never dereferenced
    name = ctypes.create_string_buffer(b"SMOE-ABI-PROBE")
    callbacks = {
        "get_name": BUFT_GET_NAME(lambda _b: ctypes.addressof(name)),
        "get_alignment": BUFT_GET_ALIGNMENT(lambda _b: 8192),
        "is_host": BUFT_IS_HOST(lambda _b: True),
    }
    probe = buft_struct()
    for field, cb in callbacks.items():
        if hasattr(probe.iface, field):
            setattr(probe.iface, field, cb)
    probe.device = device
    probe.context = context
    addr = ctypes.addressof(probe)
    _expect("buffer type .device as ggml reads it", ggml_backend_buft_get_device(addr), device)
    _expect("buffer type get_name slot", ggml_backend_buft_name(addr), b"SMOE-ABI-PROBE")
    _expect("buffer type get_alignment slot", ggml_backend_buft_get_alignment(addr), 8192)
    _expect("buffer type get_max_size slot (NULL: SIZE_MAX)", ggml_backend_buft_get_max_size(addr), 2**64 - 1)
    _expect("buffer type is_host slot", ggml_backend_buft_is_host(addr), True)
