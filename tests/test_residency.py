"""Asynchronous fetching: prefetches charge the budget at once, never evict a leaf in use, and a
failed prefetch surfaces as the named error of the leaf when a gate needs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from smoe_gguf.engine import Engine
from smoe_gguf.errors import SmoeError
from smoe_gguf.pack import manifest as mf
from smoe_gguf.pack.split import split

from .engine_helpers import N_TOKENS, PROMPT, budgets, corrupted_pack, reference, same

# One architecture of each layer layout: experts in every layer (and gpt-oss's own activation
# node), dense first layers (deepseek2), experts every other layer (llama4).
PIPELINE_ARCHS = ("qwen3moe", "qwen2moe", "mixtral", "gpt-oss", "deepseek2", "llama4")


def test_full_budget_warms_in_the_background_then_stops_gating(tiny_model, pack_of) -> None:
    src, pack = tiny_model("qwen2moe", "f16"), pack_of("qwen2moe", "f16")
    with Engine(pack, budget="100%", n_ctx=256, n_threads=2) as eng:
        r = eng.residency
        eng.decode(eng.tokenize("Hi"))  # routes to a few leaves; the rest is queued for the I/O thread
        r.drain()
        assert r.stats.prefetched > 0
        assert r.n_resident == len(eng.source.store.leaves) and r.used == r.total_cost
        eng.reset()
        gen = eng.generate(PROMPT, N_TOKENS, keep_logits=True)
        assert not eng.gate.gating, "every leaf resident: llama.cpp must compute each graph in one piece"
        assert same(reference(src, eng), gen.tokens, gen.logits)


def test_prefetch_charges_now_and_protects_the_leaves_in_use(pack_of) -> None:
    pack = pack_of("qwen3moe", "f16")
    with Engine(pack, budget=budgets(pack)["min"], n_ctx=256, n_threads=2) as eng:
        r = eng.residency
        n_used = eng.source.n_expert_used
        in_use = list(range(n_used))
        r.on_experts(0, np.array(in_use))
        r.finish_layer(0)  # the down node (part pipelining)
        assert r.used == r.budget  # the minimum budget is exactly one layer's selected leaves
        # Everything else of layers 0 and 1 asked for: nothing of in_use may go, so nothing fits.
        wanted = [(0, e) for e in range(n_used, 2 * n_used)] + [(1, e) for e in range(n_used)]
        assert r.prefetch(wanted, layer=0, in_use=in_use) == 0
        assert all(r.state.resident[0, e] for e in in_use)
        # Once layer 0 is no longer in use, the prefetch evicts it and charges before any byte moves.
        queued = r.prefetch([(1, e) for e in range(n_used)], layer=1, in_use=[])
        assert queued == n_used and r.used <= r.budget
        r.drain()
        assert all(r.state.resident[1, e] for e in range(n_used))
        assert not any(r.state.resident[0, e] for e in in_use)
        assert eng.xslot.mincore_bytes() <= r.budget and r.stats.peak_bytes <= r.budget
        # The gate then finds them resident: no load, no stall.
        loaded = r.stats.leaves_loaded
        r.on_experts(1, np.array(range(n_used)))
        assert r.stats.leaves_loaded == loaded


def test_a_prefetch_landing_while_the_gate_makes_room_is_evictable() -> None:
    """The gate takes a snapshot of the evictable leaves; a prefetch that lands after it (here:
    while the gate evicts another leaf) must still be evicted when the gate needs its room, not
    reported as a budget too small. Found as a rare failure of a full test run on a fresh clone."""
    import threading

    from smoe_gguf.residency import Residency

    a_may_land = threading.Event()
    r: Residency

    def fill(layer: int, e: int, _stage: int | None) -> None:
        if (layer, e) == (0, 1):  # prefetch A: lands only when allowed
            assert a_may_land.wait(10)

    def release(layer: int, e: int) -> None:
        if (layer, e) == (0, 0):  # the gate evicts X: A lands meanwhile
            a_may_land.set()
            r.drain()

    r = Residency({0: 1, 1: 3}, 4, budget=3, fill=fill, release=release)
    r.on_experts(0, np.array([[0]]))  # X resident (1 byte)
    assert r.prefetch([(0, 1)], layer=0, in_use=[0]) == 1  # A charged and loading (1 byte)
    r.on_experts(1, np.array([[0]]))  # B needs all 3 bytes: X and then A must go
    assert r.state.resident[1, 0] and not r.state.resident[0, 0] and not r.state.resident[0, 1]
    assert r.used == 3 == r.budget
    r.close()


def test_a_failed_prefetch_names_the_leaf_when_the_gate_needs_it(tiny_model, tmp_path: Path) -> None:
    pack = tmp_path / "p.pack"
    corrupted_pack(tiny_model("qwen3moe", "f16"), pack, layer=1, index=0, expert=2)
    with Engine(pack, budget="100%", n_ctx=256, n_threads=2) as eng:
        r = eng.residency
        assert r.prefetch([(1, 2), (1, 3)]) == 2
        r.drain()
        assert not r.state.resident[1, 2] and r.state.resident[1, 3]
        with pytest.raises(SmoeError, match="layer 1 expert 2.*checksum mismatch"):
            r.on_experts(1, np.array([2, 3]))
        r.reap_failures()
        assert r.used == r.leaf_cost(1)  # only (1, 3) is still charged


@pytest.mark.parametrize("arch", PIPELINE_ARCHS)
def test_the_down_node_splits_the_graph_only_where_down_parts_are_in_flight(tiny_model, pack_of, arch: str) -> None:
    """Part pipelining (off by default, --pipeline) stops the graph at a layer's down node only
    when that layer's top-k gate left down parts to finish; a layer whose leaves were all resident
    runs through (a graph split costs the compute threads a barrier). Bit-exact on every
    architecture (gpt-oss has its own activation node)."""
    src, pack = tiny_model(arch, "f16"), pack_of(arch, "f16")
    with Engine(pack, budget="75%", n_ctx=256, n_threads=2, profile=None, speculate=False, pipeline=True) as eng:
        r = eng.residency
        assert r.pipeline
        gen = eng.generate(PROMPT, N_TOKENS, keep_logits=True)
        assert 0 < r.stats.down_nodes == eng.gate.py_nodes < eng.gate.n_gated
        assert same(reference(src, eng), gen.tokens, gen.logits)


def test_a_bad_down_part_read_by_the_pipeline_is_named(tiny_model, tmp_path: Path) -> None:
    pack = tmp_path / "p.pack"
    split(tiny_model("qwen3moe", "f16"), pack)
    for leaf in mf.load(pack).leaves:  # the down part (stage 1) of every leaf of layer 0
        if leaf.layer == 0:
            down = next(p for p in leaf.parts if p.stage == 1)
            path = pack / leaf.file
            data = bytearray(path.read_bytes())
            data[down.offset + 7] ^= 0x10
            path.write_bytes(bytes(data))
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None, pipeline=True) as eng:
        assert eng.residency.pipeline
        with pytest.raises(SmoeError, match=r"layer 0 expert \d+.*checksum mismatch"):
            eng.generate(PROMPT, 4)
        assert eng.residency.used <= eng.budget
