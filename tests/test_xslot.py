"""X-Slot prototype proof: llama.cpp computes on paged experts and the logits stay bit-identical."""

from __future__ import annotations

import ctypes
import os
import sys
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest

from smoe_gguf import archs, xslot
from smoe_gguf import ggml_abi as abi
from smoe_gguf.devtools import stock
from smoe_gguf.devtools.testmodels import build_test_model
from smoe_gguf.errors import SmoeError
from smoe_gguf.gate import Gate
from smoe_gguf.xslot import HIDDEN_PREFIX, PAGE, XSlot

PROMPT = "The quick brown fox jumps over the lazy dog, then"
N_TOKENS = 20

# ----------------------------------------------------------------------------- unit level


@pytest.fixture
def slot_with_tensor() -> Iterator[tuple[XSlot, int, int]]:
    """An X-Slot buffer holding one [50, 30, 7] F16 tensor (slice 3000 bytes: not a page multiple)."""
    xs = XSlot()
    params = abi.GgmlInitParams(mem_size=4 * abi.ggml_tensor_overhead(), mem_buffer=None, no_alloc=True)
    ctx = abi.ggml_init(params)
    t = abi.ggml_new_tensor_3d(ctx, abi.GGML_TYPE_F16, 50, 30, 7)
    abi.ggml_set_name(t, b"blk.0.ffn_up_exps.weight")
    buf = abi.ggml_backend_buft_alloc_buffer(xs.buft, abi.ggml_nbytes(t))
    assert buf
    assert abi.ggml_backend_tensor_alloc(buf, t, abi.ggml_backend_buffer_get_base(buf)) == abi.GGML_STATUS_SUCCESS
    yield xs, buf, t
    abi.ggml_backend_buffer_free(buf)
    abi.ggml_free(ctx)
    assert xs.buffers == {} and xs.regions == {}


def test_buffer_type_as_ggml_sees_it(slot_with_tensor: tuple[XSlot, int, int]) -> None:
    xs, buf, t = slot_with_tensor
    assert abi.ggml_backend_buft_name(xs.buft) == b"XSLOT"
    assert abi.ggml_backend_buft_get_alignment(xs.buft) == 4096
    assert abi.ggml_backend_buft_get_device(xs.buft) == abi.cpu_device()
    assert abi.ggml_backend_buffer_get_type(buf) == xs.buft
    base = abi.ggml_backend_buffer_get_base(buf)
    assert base % PAGE == 0 and xs.buffers[buf][0] == base
    assert not abi.ggml_backend_buffer_is_host(buf)
    # while loading, the tensor goes by a name llama.cpp's loader finds no weight for
    assert abi.ggml_get_name(t).startswith(HIDDEN_PREFIX) and xs.hidden_tensors == 1
    xs.finish_loading()
    assert abi.ggml_backend_buffer_is_host(buf)
    assert abi.ggml_get_name(t) == b"blk.0.ffn_up_exps.weight" and xs.hidden_tensors == 0

    r = xs.regions["blk.0.ffn_up_exps.weight"]
    assert (r.address, r.nbytes, r.n_expert, r.slice_bytes) == (base, 50 * 30 * 7 * 2, 7, 3000)
    assert r.ne == (50, 30, 7, 1) and r.nb == (2, 100, 3000, 21000) and r.tensor == t
    assert xs.slice_address(r.name, 3) == base + 9000


def test_set_tensor_copies_nothing_while_loading(slot_with_tensor: tuple[XSlot, int, int]) -> None:
    xs, _, t = slot_with_tensor
    n = abi.ggml_nbytes(t)
    data = (ctypes.c_uint8 * n)(*([7] * n))
    abi.ggml_backend_tensor_set(t, data, 0, n - 10)
    assert xs.loading
    abi.ggml_backend_tensor_set(t, data, n - 10, 10)
    assert xs.offered_bytes == n
    assert not xs.loading  # every byte offered: is_host turned true by itself
    assert xs.mincore_bytes() == 0  # not one page touched
    xs.finish_loading()
    abi.ggml_backend_tensor_set(t, data, 0, 100)  # after loading it is an ordinary host buffer
    out = (ctypes.c_uint8 * 100)()
    abi.ggml_backend_tensor_get(t, out, 0, 100)
    assert bytes(out) == bytes([7] * 100)


def test_misaligned_tensor_is_refused() -> None:
    xs = XSlot()
    ctx = abi.ggml_init(abi.GgmlInitParams(mem_size=4 * abi.ggml_tensor_overhead(), mem_buffer=None, no_alloc=True))
    t = abi.ggml_new_tensor_3d(ctx, abi.GGML_TYPE_F16, 64, 64, 4)
    abi.ggml_set_name(t, b"blk.0.ffn_down_exps.weight")
    buf = abi.ggml_backend_buft_alloc_buffer(xs.buft, 2 * abi.ggml_nbytes(t))
    try:
        base = abi.ggml_backend_buffer_get_base(buf)
        assert abi.ggml_backend_tensor_alloc(buf, t, base + 64) == abi.GGML_STATUS_FAILED
        assert xs.regions == {}
        with pytest.raises(SmoeError, match="page boundary"):
            xs.finish_loading()
    finally:
        abi.ggml_backend_buffer_free(buf)
        abi.ggml_free(ctx)


def test_load_evict_page_accounting(slot_with_tensor: tuple[XSlot, int, int], tmp_path: Path) -> None:
    xs, _, _ = slot_with_tensor
    xs.finish_loading()
    name = "blk.0.ffn_up_exps.weight"
    r = xs.regions[name]
    src = np.random.default_rng(0).integers(1, 255, r.nbytes + 123, dtype=np.uint8)
    path = tmp_path / "src.bin"
    path.write_bytes(src.tobytes())
    fd = os.open(path, os.O_RDONLY)
    region = np.ctypeslib.as_array((ctypes.c_uint8 * r.nbytes).from_address(r.address))
    try:
        rng = np.random.default_rng(1)
        for step in range(300):
            e = int(rng.integers(0, r.n_expert))
            u = rng.random()
            if u < 0.55:
                xs.load_slice(name, e, fd, 123 + e * r.slice_bytes)
            elif u < 0.8:
                xs.evict_slice(name, e)
            else:  # several at once, neighbours among them
                xs.evict_slices(name, rng.integers(0, r.n_expert, int(rng.integers(1, 6))).tolist())
            resident = [k for k in range(r.n_expert) if xs.is_resident(name, k)]
            assert xs.resident_bytes == len(resident) * r.slice_bytes
            assert xs.mincore_bytes() == xs.resident_page_bytes(), step
            assert xs.resident_page_bytes() <= xs.resident_bytes + xs.page_slack_bound(len(resident), r.slice_bytes)
            for k in resident:  # a neighbour's eviction never damages a resident slice
                s = slice(k * r.slice_bytes, (k + 1) * r.slice_bytes)
                assert np.array_equal(region[s], src[123:][s]), (step, k)
        xs.evict_all()
        assert xs.resident_bytes == 0 and xs.mincore_bytes() == 0
    finally:
        os.close(fd)


def test_neighbouring_slices_evicted_together_are_one_fresh_mapping(
        slot_with_tensor: tuple[XSlot, int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices evicted together release their pages with one mapping call per run of neighbours,
    the pages a resident slice still uses kept."""
    xs, _, _ = slot_with_tensor
    xs.finish_loading()
    name = "blk.0.ffn_up_exps.weight"  # 3000-byte slices: neighbours share boundary pages
    for e in range(7):
        xs.fill_slice(name, e, lambda view: view.__setitem__(slice(None), b"\x07" * len(view)))
    calls: list[tuple[int, int]] = []
    real = xslot._map_anon
    monkeypatch.setattr(xslot, "_map_anon", lambda a, n, **kw: (calls.append((a, n)), real(a, n, **kw))[1])
    xs.evict_slices(name, [5, 1, 4, 2])  # two runs, 1-2 and 4-5, each freeing the page inside it
    assert calls == [(xs.regions[name].address + PAGE, PAGE), (xs.regions[name].address + 3 * PAGE, PAGE)]
    assert [xs.is_resident(name, e) for e in range(7)] == [True, False, False, True, False, False, True]
    assert xs.mincore_bytes() == xs.resident_page_bytes()


def test_map_slice_zero_copy(tmp_path: Path) -> None:
    xs = XSlot()
    ctx = abi.ggml_init(abi.GgmlInitParams(mem_size=4 * abi.ggml_tensor_overhead(), mem_buffer=None, no_alloc=True))
    t = abi.ggml_new_tensor_3d(ctx, abi.GGML_TYPE_F16, 1024, 2, 6)  # slice = 4096 bytes = one page
    abi.ggml_set_name(t, b"blk.0.ffn_gate_exps.weight")
    buf = abi.ggml_backend_buft_alloc_buffer(xs.buft, abi.ggml_nbytes(t))
    path = tmp_path / "src.bin"
    src = np.random.default_rng(2).integers(0, 256, PAGE + 6 * 4096, dtype=np.uint8)
    path.write_bytes(src.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        abi.ggml_backend_tensor_alloc(buf, t, abi.ggml_backend_buffer_get_base(buf))
        xs.finish_loading()
        name = "blk.0.ffn_gate_exps.weight"
        r = xs.regions[name]
        region = np.ctypeslib.as_array((ctypes.c_uint8 * r.nbytes).from_address(r.address))
        for e in (1, 2, 4):
            xs.map_slice(name, e, fd, PAGE + e * 4096)
        for e in (1, 2, 4):
            assert np.array_equal(region[e * 4096 : (e + 1) * 4096], src[PAGE + e * 4096 : PAGE + (e + 1) * 4096])
        assert xs.mincore_bytes() == xs.resident_page_bytes() == 3 * 4096  # the file is in the page cache
        region[4096] ^= 0xFF  # MAP_PRIVATE: a write stays in the X-Slot
        assert path.read_bytes()[PAGE + 4096] == src[PAGE + 4096]
        xs.evict_slice(name, 2)
        assert xs.mincore_bytes() == xs.resident_page_bytes() == 2 * 4096
        assert not region[2 * 4096 : 3 * 4096].any()
        with pytest.raises(SmoeError, match="not page-aligned"):
            xs.map_slice(name, 3, fd, 100)
    finally:
        os.close(fd)
        abi.ggml_backend_buffer_free(buf)
        abi.ggml_free(ctx)


def _n_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages move with Linux's mremap")
def test_move_slice_hands_pages_to_the_incoming_slice(tmp_path: Path) -> None:
    """Issue 13.3: an evicted page-aligned slice's pages back the incoming one; the kernel's count
    of resident pages stays that of the claimed slices, and the data of every other slice holds."""
    xs = XSlot()
    ctx = abi.ggml_init(abi.GgmlInitParams(mem_size=4 * abi.ggml_tensor_overhead(), mem_buffer=None, no_alloc=True))
    t = abi.ggml_new_tensor_3d(ctx, abi.GGML_TYPE_F16, 2048, 4, 16)  # slice = 16 KiB = 4 pages
    abi.ggml_set_name(t, b"blk.0.ffn_down_exps.weight")
    buf = abi.ggml_backend_buft_alloc_buffer(xs.buft, abi.ggml_nbytes(t))
    path = tmp_path / "src.bin"
    try:
        abi.ggml_backend_tensor_alloc(buf, t, abi.ggml_backend_buffer_get_base(buf))
        xs.finish_loading()
        name = "blk.0.ffn_down_exps.weight"
        r = xs.regions[name]
        S = r.slice_bytes
        assert S == 4 * PAGE
        src = np.random.default_rng(3).integers(1, 256, r.nbytes, dtype=np.uint8)
        region = np.ctypeslib.as_array((ctypes.c_uint8 * r.nbytes).from_address(r.address))

        def fill(e: int) -> None:
            xs.fill_slice(name, e, lambda view: view.__setitem__(slice(None), src[e * S : (e + 1) * S].tobytes()))

        def check(resident: list[int]) -> None:
            assert sorted(k for k in range(r.n_expert) if xs.is_resident(name, k)) == sorted(resident)
            assert xs.mincore_bytes() == xs.resident_page_bytes() == len(resident) * S
            for k in resident:
                assert np.array_equal(region[k * S : (k + 1) * S], src[k * S : (k + 1) * S]), k

        for e in (0, 1, 2, 3):
            fill(e)
        assert xs.move_slice(name, 1, name, 9) == S  # 1 evicted, its pages now back 9 (claimed)
        assert not xs.is_resident(name, 1) and xs.is_resident(name, 9)
        assert xs.mincore_bytes() == 4 * S  # not one page released, not one faulted
        fill(9)
        check([0, 2, 3, 9])
        assert xs.moved_bytes == S
        # a destination already claimed, or a source mapped from a file: evicted, nothing moved
        assert xs.move_slice(name, 2, name, 9) == 0
        check([0, 3, 9])
        path.write_bytes(src.tobytes())
        fd = os.open(path, os.O_RDONLY)
        try:
            xs.map_slice(name, 5, fd, 5 * S)
        finally:
            os.close(fd)
        assert xs.move_slice(name, 5, name, 6) == 0
        check([0, 3, 9])
        # moved pages never filled are released with the slice
        assert xs.move_slice(name, 3, name, 7) == S
        xs.evict_slice(name, 7)
        check([0, 9])
        # many moves: each slice holding moved pages is one mapping; their number stays bounded
        fill(1)
        before = _n_mappings()
        rng = np.random.default_rng(4)
        lru = [0, 1, 9]
        for _ in range(300):
            e = int(rng.integers(0, r.n_expert))
            if e in lru:
                continue
            victim = lru.pop(0)
            assert xs.move_slice(name, victim, name, e) == S
            fill(e)
            lru.append(e)
        check(lru)
        assert _n_mappings() <= before + r.n_expert
    finally:
        abi.ggml_backend_buffer_free(buf)
        abi.ggml_free(ctx)


def test_move_slice_evicts_slices_that_are_not_whole_pages(slot_with_tensor: tuple[XSlot, int, int]) -> None:
    xs, _, _ = slot_with_tensor
    xs.finish_loading()
    name = "blk.0.ffn_up_exps.weight"  # 3000-byte slices: their boundary pages are shared
    for e in (0, 1, 2):
        xs.fill_slice(name, e, lambda view: view.__setitem__(slice(None), b"\x07" * len(view)))
    assert xs.move_slice(name, 1, name, 5) == 0
    assert not xs.is_resident(name, 1) and not xs.is_resident(name, 5)
    assert xs.mincore_bytes() == xs.resident_page_bytes() and xs.moved_bytes == 0


def test_fill_slice_failure_releases_pages(slot_with_tensor: tuple[XSlot, int, int]) -> None:
    xs, _, _ = slot_with_tensor
    xs.finish_loading()
    name = "blk.0.ffn_up_exps.weight"

    def fill(view: memoryview) -> None:
        view[:] = b"\x05" * len(view)

    xs.fill_slice(name, 2, fill)
    assert xs.is_resident(name, 2) and xs.mincore_bytes() == xs.resident_page_bytes() > 0

    def half_then_fail(view: memoryview) -> None:
        view[: len(view) // 2] = b"\x07" * (len(view) // 2)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        xs.fill_slice(name, 3, half_then_fail)  # shares a page with resident slice 2
    assert not xs.is_resident(name, 3) and xs.is_resident(name, 2)
    assert xs.resident_bytes == xs.regions[name].slice_bytes
    assert xs.mincore_bytes() == xs.resident_page_bytes()


def test_clear_releases_everything(slot_with_tensor: tuple[XSlot, int, int], tmp_path: Path) -> None:
    xs, buf, _ = slot_with_tensor
    xs.finish_loading()
    name = "blk.0.ffn_up_exps.weight"
    path = tmp_path / "src.bin"
    path.write_bytes(b"\x01" * xs.regions[name].nbytes)
    fd = os.open(path, os.O_RDONLY)
    try:
        for e in range(7):
            xs.load_slice(name, e, fd, e * 3000)
    finally:
        os.close(fd)
    assert xs.mincore_bytes() > 0
    abi.ggml_backend_buffer_clear(buf, 0)
    assert xs.mincore_bytes() == 0 and xs.resident_bytes == 0 and not xs.is_resident(name, 0)


# ----------------------------------------------------------------------------- with llama.cpp


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_model(tmp_path_factory.mktemp("xslot") / "tiny-qwen3moe.gguf", "qwen3moe", "tiny", "f16")


_REFERENCE: dict[tuple[Path, int, bool], stock.GreedyRun] = {}


def reference(model: Path, n_ubatch: int = 512, extra_bufts: bool = True) -> stock.GreedyRun:
    """Plain llama.cpp with the same micro-batch size (it changes the prompt's arithmetic)."""
    key = (model, n_ubatch, extra_bufts)
    if key not in _REFERENCE:
        mparams = stock.model_params()
        mparams.use_extra_bufts = extra_bufts
        cparams = stock.context_params(n_batch=n_ubatch, n_ubatch=n_ubatch)
        _REFERENCE[key] = stock.run_greedy(model, PROMPT, N_TOKENS, mparams, cparams)
    return _REFERENCE[key]


class LeafLRU:
    """The test's pager: an LRU of at most ``capacity`` leaves that never evicts a leaf the
    router just selected; a step that needs more leaves than fit is an error, not an overflow."""

    def __init__(self, xs: XSlot, model_path: Path, capacity: int | None, load: bool = True) -> None:
        self.xs = xs
        self.capacity = capacity
        self.load = load
        self.lru: OrderedDict[tuple[int, int], None] = OrderedDict()
        reader = gguf.GGUFReader(model_path)
        self.src = {str(t.name): int(t.data_offset) for t in reader.tensors}
        self.fd = os.open(model_path, os.O_RDONLY)
        self.parts: dict[int, list[str]] = {}
        self.slice_bytes: dict[str, int] = {}
        self.peak_mincore = 0
        self.peak_leaves = 0
        self.n_loads = 0
        self.n_evictions = 0

    def close(self) -> None:
        os.close(self.fd)

    def index_parts(self) -> None:
        for name in self.xs.regions:
            parsed = archs.parse_expert_tensor(name)
            assert parsed is not None, name
            self.parts.setdefault(parsed[0], []).append(name)
            self.slice_bytes[name] = self.xs.regions[name].slice_bytes

    def on_experts(self, layer: int, ids: np.ndarray) -> None:
        if not self.load:
            return
        need = {int(e) for e in np.unique(ids)}
        if self.capacity is not None and len(need) > self.capacity:
            raise SmoeError(f"layer {layer} needs {len(need)} leaves, capacity {self.capacity}")
        for e in need:
            key = (layer, e)
            if key in self.lru:
                self.lru.move_to_end(key)
                continue
            for name in self.parts[layer]:
                r = self.xs.regions[name]
                self.xs.load_slice(name, e, self.fd, self.src[name] + e * r.slice_bytes)
            self.lru[key] = None
            self.n_loads += 1
        while self.capacity is not None and len(self.lru) > self.capacity:
            victim = next(k for k in self.lru if k[0] != layer or k[1] not in need)
            del self.lru[victim]
            for name in self.parts[victim[0]]:
                self.xs.evict_slice(name, victim[1])
            self.n_evictions += 1
        self.peak_leaves = max(self.peak_leaves, len(self.lru))
        self.peak_mincore = max(self.peak_mincore, self.xs.mincore_bytes())


def run_xslot(model: Path, capacity: int | None, n_ubatch: int = 512, load: bool = True,
              extra_bufts: bool = True) -> tuple[stock.GreedyRun, LeafLRU, XSlot]:
    xs = XSlot()
    mparams = stock.model_params()
    mparams.use_extra_bufts = extra_bufts
    mparams.load_mode = abi.llama_cpp.LLAMA_LOAD_MODE_MMAP
    mparams.tensor_buft_overrides = xs.tensor_buft_overrides()
    pager = LeafLRU(xs, model, capacity, load)
    gate = Gate(pager.on_experts)
    cparams = stock.context_params(n_batch=n_ubatch, n_ubatch=n_ubatch)
    gate.install(cparams)
    cparams.op_offload = False
    llm = stock.load_model(model, mparams)
    ctx = None
    try:
        # llama.cpp's loader passed over every expert tensor: it offered and read none of their bytes
        assert xs.hidden_tensors == len(xs.regions) > 0 and xs.offered_bytes == 0
        assert xs.loading and xs.mincore_bytes() == 0
        xs.finish_loading()
        assert xs.hidden_tensors == 0
        names = {abi.ggml_get_name(r.tensor).decode() for r in xs.regions.values()}
        assert names == set(xs.regions)  # every tensor has its name back
        pager.index_parts()
        ctx = stock.new_context(llm, cparams)
        vocab = abi.llama_cpp.llama_model_get_vocab(llm)
        run = stock.greedy_loop(ctx, abi.llama_cpp.llama_vocab_n_tokens(vocab), stock.tokenize_with(vocab, PROMPT),
                                N_TOKENS, cparams.n_batch)
        gate.check()
        assert gate.n_gated > 0
        return run, pager, xs
    finally:
        if ctx is not None:
            stock.free_context(ctx)
        abi.llama_cpp.llama_model_free(llm)
        pager.close()


def _all_equal(a: stock.GreedyRun, b: stock.GreedyRun) -> bool:
    return a.tokens == b.tokens and all(np.array_equal(x, y) for x, y in zip(a.logits, b.logits, strict=True))


def test_all_leaves_fit_bit_exact(tiny_model: Path) -> None:
    run, pager, xs = run_xslot(tiny_model, capacity=None)
    assert _all_equal(run, reference(tiny_model))
    assert pager.n_evictions == 0
    assert xs.offered_bytes == 0  # llama.cpp's loader never offered an expert byte
    assert not xs.buffers  # llama_model_free freed (munmapped) the X-Slot buffer


@pytest.mark.parametrize(("capacity", "n_ubatch"), [(16, 4), (5, 1)])
def test_small_lru_bit_exact_and_bounded(tiny_model: Path, capacity: int, n_ubatch: int) -> None:
    run, pager, xs = run_xslot(tiny_model, capacity=capacity, n_ubatch=n_ubatch)
    assert _all_equal(run, reference(tiny_model, n_ubatch))
    assert pager.n_evictions > 0 and pager.peak_leaves <= capacity
    # the tiny model's layers all have the same parts and shapes: bound by layer 0's slices
    leaf_bytes = sum(pager.slice_bytes[name] for name in pager.parts[0])
    slack = sum(xs.page_slack_bound(capacity, pager.slice_bytes[name]) for name in pager.parts[0])
    assert pager.peak_mincore <= capacity * leaf_bytes + slack
    assert leaf_bytes % PAGE != 0  # the boundary-page case is exercised


def test_negative_control_differs(tiny_model: Path) -> None:
    run, pager, _ = run_xslot(tiny_model, capacity=None, load=False)
    assert not _all_equal(run, reference(tiny_model))
    assert pager.n_loads == 0


def test_repacked_quant_bit_exact_without_extra_buffer_types(tmp_path: Path) -> None:
    """Q4_K (like Q4_0, Q5_K, Q6_K, Q2_K, Q8_0, IQ4_NL, MXFP4) is repacked by llama.cpp's CPU
    backend on AVX2/NEON machines ("CPU_REPACK" extra buffer type) and multiplied with other
    kernels; X-Slot experts keep the file layout. Bit-exactness holds against stock llama.cpp
    with use_extra_bufts=false on both sides (with repacking on, the results differ in rounding)."""
    model = build_test_model(tmp_path / "tiny-q4k.gguf", "qwen3moe", "tiny", "q4_k")
    run, pager, _ = run_xslot(model, capacity=16, n_ubatch=4, extra_bufts=False)
    assert pager.n_evictions > 0
    assert _all_equal(run, reference(model, 4, extra_bufts=False))


def test_batch_without_outputs_gates_an_empty_last_layer(tiny_model: Path) -> None:
    """llama.cpp's last layer computes only the tokens whose logits are wanted: a batch that
    wants none has a 0-row ``ffn_moe_topk`` there; the gate must pass it without calling the hook."""
    L = abi.llama_cpp
    xs = XSlot()
    mparams = stock.model_params()
    mparams.tensor_buft_overrides = xs.tensor_buft_overrides()
    calls: list[tuple[int, int]] = []
    gate = Gate(lambda layer, ids: calls.append((layer, ids.shape[0])))
    cparams = stock.context_params()
    gate.install(cparams)
    llm = stock.load_model(tiny_model, mparams)
    batch = L.llama_batch_init(3, 0, 1)
    ctx = None
    try:
        xs.finish_loading()
        ctx = stock.new_context(llm, cparams)
        for i, tok in enumerate((5, 6, 7)):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, i, 1, 0
            batch.seq_id[i][0] = 0
        batch.n_tokens = 3
        assert L.llama_decode(ctx, batch) == 0
        gate.check()
        n_layer = 1 + max(layer for layer, _ in calls)
        assert gate.n_gated == n_layer  # the last layer's 0-row node is passed over ...
        assert calls == [(layer, 3) for layer in range(n_layer)]  # ... and the hook not called
    finally:
        L.llama_batch_free(batch)
        if ctx is not None:
            stock.free_context(ctx)
        L.llama_model_free(llm)


def test_hook_failure_is_reported(tiny_model: Path) -> None:
    with pytest.raises(SmoeError, match="needs .* leaves"):
        run_xslot(tiny_model, capacity=2, n_ubatch=512)
