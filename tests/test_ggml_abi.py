"""The hand-written ggml layouts match the loaded library, and a wrong one is caught."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from smoe_gguf import ggml_abi as abi
from smoe_gguf.errors import SmoeError


def test_check_layout_passes() -> None:
    abi.check_layout()


def test_known_offsets() -> None:
    assert ctypes.sizeof(abi.GgmlTensor) == 336
    assert abi.TENSOR_DATA_OFFSET == 248
    assert abi.TENSOR_NAME_OFFSET == 256
    assert ctypes.sizeof(abi.GgmlBackendBufferI) == 8 * abi.BUFFER_IFACE_SLOTS


def _without(fields: list[tuple], name: str) -> list[tuple]:
    return [f for f in fields if f[0] != name]


def test_tensor_missing_field_is_detected() -> None:
    class NoViewOffs(ctypes.Structure):  # data, name, extra move by 8; the size shrinks
        _fields_ = _without(abi.GgmlTensor._fields_, "view_offs")

    with pytest.raises(abi.LayoutError, match="sizeof"):
        abi.check_layout(tensor_struct=NoViewOffs)


def test_tensor_swapped_fields_are_detected() -> None:
    fields = list(abi.GgmlTensor._fields_)
    names = [f[0] for f in fields]
    i, j = names.index("ne"), names.index("nb")
    fields[i], fields[j] = ("nb", fields[i][1]), ("ne", fields[j][1])  # same size, ne and nb exchanged

    class Swapped(ctypes.Structure):
        _fields_ = fields

    with pytest.raises(abi.LayoutError, match="ne"):
        abi.check_layout(tensor_struct=Swapped)


def test_tensor_wrong_name_offset_is_detected() -> None:
    fields = list(abi.GgmlTensor._fields_)
    i = [f[0] for f in fields].index("name")
    # shift name by 8 bytes, keep the total size: only the name comparison can catch it
    fields[i : i + 1] = [("_pad", ctypes.c_char * 8), ("name", ctypes.c_char * (abi.GGML_MAX_NAME - 8))]

    class ShiftedName(ctypes.Structure):
        _fields_ = fields

    assert ctypes.sizeof(ShiftedName) == ctypes.sizeof(abi.GgmlTensor)
    with pytest.raises(abi.LayoutError, match="name"):
        abi.check_layout(tensor_struct=ShiftedName)


def test_buffer_iface_slot_count_is_detected() -> None:
    class BufferI12(ctypes.Structure):
        _fields_ = [*abi.GgmlBackendBufferI._fields_, ("extra_slot", ctypes.c_void_p)]

    class Buffer12(ctypes.Structure):
        _fields_ = [("iface", BufferI12), *abi.GgmlBackendBuffer._fields_[1:]]

    with pytest.raises(abi.LayoutError, match="buffer.buft"):
        abi.check_layout(buffer_struct=Buffer12)


def test_buft_iface_slot_count_is_detected() -> None:
    class BuftI7(ctypes.Structure):  # one slot too many: device and context move
        _fields_ = [*abi.GgmlBackendBufferTypeI._fields_, ("extra_slot", ctypes.c_void_p)]

    class Buft7(ctypes.Structure):
        _fields_ = [("iface", BuftI7), *abi.GgmlBackendBufferType._fields_[1:]]

    with pytest.raises(abi.LayoutError, match="device"):
        abi.check_layout(buft_struct=Buft7)


def test_version_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_cpp

    monkeypatch.setattr(llama_cpp, "__version__", "0.3.99")
    with pytest.raises(SmoeError, match=r"llama-cpp-python 0\.3\.99 .*==0\.3\.36"):
        abi._import_llama_cpp()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_one_copy_of_each_ggml_library(tiny_model) -> None:
    """ggml_abi binds the library files llama.cpp links to: the wheel holds copies under several
    names, and a second copy in the process has globals of its own."""
    code = (
        "import sys\n"
        "from smoe_gguf import ggml_abi\n"
        "from smoe_gguf.devtools import stock\n"
        "stock.greedy(sys.argv[1], 'hi', n_tokens=1, n_ctx=64)\n"
        "libs = {line.split()[-1] for line in open('/proc/self/maps') if '/libggml' in line}\n"
        "print(' '.join(sorted(p.rsplit('/', 1)[-1] for p in libs)))\n"
    )
    names = subprocess.run([sys.executable, "-c", code, str(tiny_model("qwen3moe", "f16"))], capture_output=True,
                           text=True, check=True).stdout.split()
    for lib in ("libggml-base", "libggml", "libggml-cpu"):
        copies = [n for n in names if n.split(".so")[0] == lib]
        assert len(copies) == 1, f"{lib} is mapped from {copies}"


def test_the_plain_cpu_buffer_type_is_llama_cpp_s_at_an_address_of_its_own() -> None:
    """The reference's experts go to a buffer type that works as llama.cpp's CPU one (host memory,
    the CPU device, the same functions) but is not that one, so llama.cpp's loader does not repack
    the weights overridden to it."""
    plain, cpu = abi.plain_cpu_buffer_type(), abi.ggml_backend_cpu_buffer_type()
    assert plain != cpu and abi.plain_cpu_buffer_type() == plain
    assert abi.ggml_backend_buft_name(plain) == abi.ggml_backend_buft_name(cpu)
    assert abi.ggml_backend_buft_is_host(plain)
    assert abi.ggml_backend_buft_get_device(plain) == abi.ggml_backend_buft_get_device(cpu)
    buf = abi.ggml_backend_buft_alloc_buffer(plain, 1 << 12)
    try:
        assert buf and abi.ggml_backend_buffer_get_type(buf) == plain and abi.ggml_backend_buffer_is_host(buf)
    finally:
        abi.ggml_backend_buffer_free(buf)


def test_a_context_holds_its_thread_pools_until_freed(tiny_model) -> None:
    """new_context attaches persistent compute thread pools, one for decode and one for prompt
    micro-batches where their sizes differ (one where they match); free_context frees them."""
    import llama_cpp

    from smoe_gguf import llama_session as ls
    from smoe_gguf.devtools import stock

    model = stock.load_model(tiny_model("qwen3moe", "f16"), stock.model_params())
    try:
        for threads, batch, pools in ((1, 2, 2), (2, 2, 1)):
            ctx = stock.new_context(model, stock.context_params(n_ctx=64, n_threads=threads, n_threads_batch=batch))
            assert len(ls._POOLS[ls._address(ctx)]) == pools
            stock.free_context(ctx)
            assert ls._address(ctx) not in ls._POOLS
    finally:
        llama_cpp.llama_model_free(model)
