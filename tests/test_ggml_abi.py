"""The hand-written ggml layouts match the loaded library, and a wrong one is caught."""

from __future__ import annotations

import ctypes

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
