"""The X-Slot runtime against stock llama.cpp on the same source file: bit-exact, in budget."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from smoe_gguf.budget import parse_budget
from smoe_gguf.devtools import stock
from smoe_gguf.devtools.testmodels import ARCHS, CASES, build_test_model
from smoe_gguf.engine import Engine
from smoe_gguf.errors import SmoeError
from smoe_gguf.pack import manifest as mf
from smoe_gguf.pack.core_check import check_core
from smoe_gguf.pack.split import split
from smoe_gguf.store import drop_page_cache

from .cli_helpers import run_cli
from .engine_helpers import N_TOKENS, PROMPT, budgets, reference, same

ALL = list(CASES)


@pytest.mark.parametrize("arch,dtype", ALL)
def test_bit_exact_against_stock_at_min_25_and_100_percent(arch: str, dtype: str, tiny_model, pack_of) -> None:
    """Every architecture and quant mix, speculation and the tree-map on (as a run has them):
    the profile the smaller budget's run saved is read and prefetched from by the next one."""
    src, pack = tiny_model(arch, dtype), pack_of(arch, dtype)
    for label, budget in budgets(pack).items():
        with Engine(pack, budget=budget, n_ctx=256, n_threads=2) as eng:
            gen = eng.generate(PROMPT, N_TOKENS, keep_logits=True)
            ref = reference(src, eng)
            assert same(ref, gen.tokens, gen.logits), f"{arch}/{dtype} at budget {label} differs from stock"
            r = eng.residency.stats
            assert r.peak_bytes <= eng.budget
            if label != "100%":
                assert r.evictions > 0, "a small budget must make the LRU evict"
                assert eng.recorder is not None and eng.speculator is not None
                paged = eng.residency.costs
                if any(layer + 1 in paged for layer in paged):  # llama4: no two MoE layers in a row
                    assert eng.speculator.stats.guesses > 0, "speculation guessed nothing"
            assert eng.xslot.mincore_bytes() <= eng.budget


def test_plain_gguf_runs_bit_exact_too(tiny_model) -> None:
    src = tiny_model("qwen2moe", "q8_0")
    with Engine(src, budget="25%", n_ctx=256, n_threads=2) as eng:
        gen = eng.generate(PROMPT, N_TOKENS, keep_logits=True)
        assert same(reference(src, eng), gen.tokens, gen.logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_negative_control_gate_off_differs(arch: str, tiny_model, pack_of) -> None:
    # With the gate loading nothing, the experts read zeros: the comparison must be able to fail.
    src, pack = tiny_model(arch, "f16"), pack_of(arch, "f16")
    with Engine(pack, budget="100%", n_ctx=256, n_threads=2) as eng:
        eng.residency.enabled = False
        gen = eng.generate(PROMPT, N_TOKENS, keep_logits=True)
        assert not same(reference(src, eng), gen.tokens, gen.logits)
        assert eng.residency.stats.gates > 0 and eng.xslot.resident_bytes == 0


def _asks_huge_pages(lo: int, hi: int) -> list[bool]:
    """For each mapping that overlaps [lo, hi): whether smaps' VmFlags has "hg" (MADV_HUGEPAGE)."""
    asks: list[bool] = []
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start < hi and lo < end
        elif inside and head == "VmFlags:":
            asks.append("hg" in line.split()[1:])
    return asks


def test_a_full_budget_takes_huge_pages_and_gives_them_up_when_it_shrinks(tiny_model, pack_of) -> None:
    """Where the budget holds every leaf, nothing is evicted: the X-Slot asks for huge pages. A
    live shrink takes the request back before evicting, the budget then holds by ``mincore``, and
    the output stays stock's throughout. A paged budget never asks for them."""
    src, pack = tiny_model("qwen3moe", "f16"), pack_of("qwen3moe", "f16")
    linux = sys.platform.startswith("linux")
    with Engine(pack, budget="100%", n_ctx=256, n_threads=2) as eng:
        spans = [(base, base + size) for base, size in eng.xslot.buffers.values()]
        assert eng.xslot.huge_pages and spans
        if linux:
            assert all(all(_asks_huge_pages(*span)) for span in spans)
        gen = eng.generate(PROMPT, N_TOKENS, keep_logits=True)
        ref = reference(src, eng)
        assert same(ref, gen.tokens, gen.logits)
        eng.set_budget("25%")
        assert not eng.xslot.huge_pages and eng.residency.stats.evictions > 0
        if linux:
            assert not any(any(_asks_huge_pages(*span)) for span in spans)
        assert eng.xslot.mincore_bytes() <= eng.budget
        eng.reset()
        gen = eng.generate(PROMPT, N_TOKENS, keep_logits=True)
        assert same(ref, gen.tokens, gen.logits)
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2) as eng:
        assert not eng.xslot.huge_pages
        if linux:
            assert not any(any(_asks_huge_pages(base, base + size)) for base, size in eng.xslot.buffers.values())


def test_a_full_budget_is_filled_from_the_first_prompt(tiny_model, pack_of) -> None:
    """A budget that holds every leaf queues them all before the first prompt's first gate (not
    after its prefill, when the first decoded tokens would wait behind the fill), and the output
    is still stock's."""
    pack = pack_of("qwen3moe", "f16")
    with Engine(pack, budget="100%", n_ctx=256, n_threads=2) as eng:
        queued_at_gate: list[int] = []
        eng.gate.observe(lambda _layer, _node, _ids: queued_at_gate.append(
            eng.residency.stats.source("fill").queued), always=True)
        gen = eng.generate(PROMPT, N_TOKENS, keep_logits=True)
        assert queued_at_gate and queued_at_gate[0] > 0
        assert eng.residency.holds_everything() and not eng.gate.gating
        assert same(reference(tiny_model("qwen3moe", "f16"), eng), gen.tokens, gen.logits)


@pytest.mark.parametrize("dtype", ["f32", "q4_k"])
def test_budget_holds_measured_by_mincore_at_every_gate(dtype: str, pack_of, tiny_model) -> None:
    """Q4_K slices are whole pages (36 KiB): an evicted leaf's pages go to the incoming one
    (issue 13.3), and the budget holds as well as where they are released (F32: 34 KiB slices).
    Every miss is served in Python here, whose hook the test wraps (test_pager.py measures the
    native pager's gates)."""
    pack = pack_of("qwen3moe", dtype)
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, native=False) as eng:
        seen: list[int] = []
        hook = eng.residency.on_experts

        def measured(layer: int, ids: np.ndarray) -> None:
            hook(layer, ids)
            seen.append(eng.xslot.mincore_bytes())

        eng.gate.on_experts = measured
        gen = eng.generate(PROMPT, N_TOKENS, keep_logits=True)
        assert seen and max(seen) <= eng.budget
        assert max(seen) > eng.budget // 2  # the measure sees real pages, not nothing
        assert eng.residency.stats.evictions > 0
        recycles = dtype == "q4_k" and eng.xslot.can_move  # can_move: Linux with MREMAP_DONTUNMAP
        assert (eng.xslot.moved_bytes > 0) == recycles  # pages recycled where slices are whole pages
        assert same(reference(tiny_model("qwen3moe", dtype), eng), gen.tokens, gen.logits)


def test_budget_below_one_token_is_refused_with_the_minimum(pack_of) -> None:
    pack = pack_of("qwen3moe", "f16")
    code, _, stderr = run_cli("run", str(pack), "-p", "hi", "-n", "2", "--budget", "4KiB")
    assert code == 1 and "below the minimum for one token" in stderr and "bytes (4 leaves of" in stderr


def test_small_budget_shrinks_the_micro_batch(pack_of) -> None:
    pack = pack_of("qwen3moe", "f16")
    with Engine(pack, budget="10%", n_ctx=256, n_threads=2) as eng:
        assert eng.n_ubatch < 512
    with Engine(pack, budget="100%", n_ctx=1024, n_threads=2) as eng:
        assert eng.n_ubatch == 512


@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupt"])
def test_a_bad_shard_is_named_when_first_read(damage: str, tiny_model, tmp_path: Path) -> None:
    pack = tmp_path / "p.pack"
    split(tiny_model("qwen3moe", "f16"), pack)
    m = mf.load(pack)
    for leaf in m.leaves:  # damage every leaf of layer 0, so the first token needs one of them
        if leaf.layer != 0:
            continue
        path = pack / leaf.file
        if damage == "missing":
            path.unlink()
        elif damage == "truncated":
            with open(path, "r+b") as f:
                f.truncate(leaf.parts[0].offset + 10)
        else:
            data = bytearray(path.read_bytes())
            data[leaf.parts[0].offset + 3] ^= 0x40
            path.write_bytes(bytes(data))
    expected = {"missing": "is missing", "truncated": "is truncated", "corrupt": "checksum mismatch"}[damage]
    code, stdout, stderr = run_cli("run", str(pack), "-p", PROMPT, "-n", "4", "--budget", "100%")
    assert code == 1 and "layer 0 expert" in stderr and expected in stderr, stderr


def test_run_cli_json_and_stats(tiny_model, pack_of) -> None:
    src, pack = tiny_model("mixtral", "q4_k"), pack_of("mixtral", "q4_k")
    code, stdout, stderr = run_cli("run", str(pack), "-p", PROMPT, "-n", "8", "--budget", "25%", "--json")
    assert code == 0, stderr
    res = json.loads(stdout)
    ref = stock.greedy(src, PROMPT, n_tokens=8, n_ubatch=res["n_ubatch"], n_batch=max(512, res["n_ubatch"]),
                       plain_experts=True)
    eog = set(stock.tokenize(src, "<|im_end|><|endoftext|>"))
    n = len(res["tokens"])  # run stops early only at an end-of-generation token
    assert n >= 1 and res["tokens"] == ref.tokens[:n] and (n == 8 or res["tokens"][-1] in eog), res["tokens"]
    for key in ("prefill_tps", "decode_tps", "ttft_seconds", "leaves_loaded", "hit_rate", "bytes_read",
                "stall_seconds", "peak_resident_bytes", "budget_bytes", "peak_rss_bytes", "startup_seconds"):
        assert key in res
    assert res["peak_resident_bytes"] <= res["budget_bytes"] and res["bytes_read"] > 0
    code, stdout, _ = run_cli("run", str(pack), "-p", PROMPT, "-n", "4", "--budget", "100%", "--stats")
    assert code == 0 and "hit rate" in stdout and "peak resident experts" in stdout


def test_parse_budget() -> None:
    assert parse_budget("512MiB", 10) == 512 << 20
    assert parse_budget("4G", 10) == 4 << 30
    assert parse_budget("1500", 10) == 1500
    assert parse_budget("25%", 1000) == 250
    for bad in ("lots", "0%", "120%", "-5"):
        with pytest.raises(SmoeError):
            parse_budget(bad, 1000)


def _read_bytes() -> int:
    return int(psutil.Process().io_counters().read_bytes)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise to drop the page cache")
def test_startup_reads_grow_with_the_core_not_the_model(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Issues 3.4 and 13.5 on the `medium` test model (1.5 GiB of experts), as a pack and as the
    plain GGUF: with the file's pages dropped from the page cache, loading reads at most
    core x 1.05 + 16 MiB from disk, and llama.cpp's loader reads no byte of any expert tensor
    (not even of the pack's sparse stub, whose hole costs time but no disk read)."""
    root = tmp_path_factory.mktemp("medium")
    src = build_test_model(root / "medium.gguf", "qwen3moe", "medium", "f16")
    pack = root / "medium.pack"
    try:
        split(src, pack)
        m = mf.load(pack)
        assert m.expert_bytes >= 1 << 30
        limit = int(m.core_bytes * 1.05) + (16 << 20)
        n_expert_tensors = sum(t.where == "leaves" for t in m.tensors)
        check_core(pack, m)  # the core's sha256 is checked at the first start only: measure a later one
        for path in (pack, src):
            drop_page_cache(path)
            before = _read_bytes()
            with Engine(path, budget="25%", n_ctx=256, n_threads=2) as eng:
                load_read = _read_bytes() - before
                assert eng.startup_read_bytes <= limit, path.name
                assert load_read <= limit, f"{path.name}: start-up read {load_read} bytes, core is {m.core_bytes}"
                assert load_read >= m.core_bytes // 2, "the I/O counter sees the core being read"
                assert eng.source.store.stats.bytes_read == 0  # no leaf was read before the first token
                # the loader passed over every expert tensor: not one byte offered to the X-Slot
                assert len(eng.xslot.regions) == n_expert_tensors and eng.xslot.offered_bytes == 0
                assert eng.xslot.hidden_tensors == 0  # and they have their names back
    finally:
        src.unlink()  # spare the disk
