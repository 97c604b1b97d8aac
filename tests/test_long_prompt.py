"""Long prompts under a budget: one large micro-batch, each leaf read at most once, bit-exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from smoe_gguf.budget import layer_budget
from smoe_gguf.devtools import stock
from smoe_gguf.engine import PROMPT_UBATCH, Engine
from smoe_gguf.pack import manifest as mf
from smoe_gguf.store import BLOCK

from .cli_helpers import run_cli

LONG = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(16))


def _layer_budget(pack: Path) -> int:
    with Engine(pack, budget="100%", n_ctx=1024, n_threads=1, profile=None) as eng:
        return eng.layer_budget


def _expert_span_bytes(pack: Path) -> int:
    """Bytes a reader of every part once reads (each part rounded to whole O_DIRECT blocks)."""
    m = mf.load(pack)
    return sum(-(-p.length // BLOCK) * BLOCK for lf in m.leaves for p in lf.parts)


def test_a_budget_of_two_layers_prefills_in_one_micro_batch_reading_each_leaf_once(tiny_model, pack_of) -> None:
    src, pack = tiny_model("qwen3moe", "f16"), pack_of("qwen3moe", "f16")
    budget = 2 * _layer_budget(pack)
    with Engine(pack, budget=budget, n_ctx=1024, n_threads=1, profile=None, speculate=False) as eng:
        assert eng.paging and eng.n_ubatch == min(PROMPT_UBATCH, 1024)
        n_prompt = len(eng.tokenize(LONG))
        assert eng.n_ubatch >= n_prompt > 300
        tokens, logits, read = [], [], 0
        for step in eng.stream(LONG, 4, keep_logits=True):
            if not tokens:  # the prompt is in; the first token is not decoded yet
                read = eng.source.store.stats.bytes_read
            tokens.append(step.token)
            logits.append(step.logits)
        assert eng.readahead is not None and eng.readahead.queued > 0  # the next layer streamed in
        assert eng.residency.stats.peak_bytes <= budget and eng.xslot.mincore_bytes() <= budget
        ref = stock.greedy(src, LONG, n_tokens=4, n_batch=eng.n_batch, n_ubatch=eng.n_ubatch, n_ctx=1024,
                           n_threads=1, plain_experts=True)
    assert ref.tokens == tokens
    assert all(np.array_equal(a, b) for a, b in zip(ref.logits, logits, strict=True))
    assert read <= 1.1 * _expert_span_bytes(pack), (read, _expert_span_bytes(pack))


def test_the_large_micro_batch_comparison_can_fail(tiny_model, pack_of) -> None:
    src, pack = tiny_model("qwen3moe", "f16"), pack_of("qwen3moe", "f16")
    with Engine(pack, budget=2 * _layer_budget(pack), n_ctx=1024, n_threads=1, profile=None) as eng:
        eng.residency.enabled = False  # the gate loads nothing: the experts read zeros
        gen = eng.generate(LONG, 2, keep_logits=True)
        ref = stock.greedy(src, LONG, n_tokens=2, n_batch=eng.n_batch, n_ubatch=eng.n_ubatch, n_ctx=1024,
                           n_threads=1, plain_experts=True)
    assert not np.array_equal(ref.logits[0], gen.logits[0])


def test_below_one_layer_a_long_prompt_gets_a_hint(tiny_model, pack_of) -> None:
    pack = pack_of("qwen3moe", "f16")
    lb = _layer_budget(pack)
    code, _, stderr = run_cli("run", str(pack), "-p", LONG, "-n", "1", "--budget", str(lb // 2), "--ctx", "1024")
    assert code == 0, stderr
    assert "hint:" in stderr and "per prompt token" in stderr and f"--budget {-(-lb // 2**20)}MiB" in stderr
    code, _, stderr = run_cli("run", str(pack), "-p", LONG, "-n", "1", "--budget", str(2 * lb), "--ctx", "1024")
    assert code == 0 and "hint:" not in stderr


def test_inspect_shows_the_one_layer_budget(tiny_model, pack_of) -> None:
    model = tiny_model("qwen3moe", "f16")
    code, stdout, _ = run_cli("inspect", "--json", str(model))
    info = json.loads(stdout)
    assert code == 0
    # what the engine sizes prompt micro-batches by: one layer of the leaves' larger stage (gate/up),
    # below one layer of whole leaves
    assert info["layer_budget_bytes"] == _layer_budget(pack_of("qwen3moe", "f16"))
    assert info["layer_budget_bytes"] < layer_budget(info["min_budget_bytes"] // info["experts_used_per_token"],
                                                     info["experts_per_layer"])


def _whole_layer_budget(pack: Path) -> int:
    with Engine(pack, budget="100%", n_ctx=1024, n_threads=1, profile=None) as eng:
        return layer_budget(eng.residency.max_leaf_cost, eng.source.n_expert)


# One architecture of each layer layout (gpt-oss: its own activation node and expert biases,
# deepseek2: dense first layers, llama4: experts every other layer).
SPLIT_ARCHS = ("qwen3moe", "gpt-oss", "deepseek2", "llama4")


@pytest.mark.parametrize("arch", SPLIT_ARCHS)
def test_below_one_layer_of_leaves_a_prompt_is_served_one_stage_at_a_time(tiny_model, pack_of, arch: str) -> None:
    """A budget that holds one layer's gate/up parts but not its whole leaves: the prompt still goes
    in one micro-batch; each layer's leaves that do not fit whole are read gate/up parts at the
    top-k gate, down parts at the down node (the orchestrator, on by default, reads ahead those
    that fit beside the gate/up parts), and let go once the layer is computed. Bit-exact, within
    the budget, each leaf read about once."""
    src, pack = tiny_model(arch, "f16"), pack_of(arch, "f16")
    stage_lb, whole_lb = _layer_budget(pack), _whole_layer_budget(pack)
    budget = (stage_lb + whole_lb) // 2
    assert stage_lb < budget < whole_lb
    with Engine(pack, budget=budget, n_ctx=1024, n_threads=1, profile=None) as eng:
        r = eng.residency
        n_prompt = len(eng.tokenize(LONG))
        assert eng.paging and r.split_prompts and eng.n_ubatch >= n_prompt
        assert eng.prompt_hint(n_prompt) is None
        tokens, logits, read = [], [], 0
        for step in eng.stream(LONG, 4, keep_logits=True):
            if not tokens:
                read = eng.source.store.stats.bytes_read
            tokens.append(step.token)
            logits.append(step.logits)
        assert r.stats.split_loads > 0 and r.stats.down_ahead > 0 and r.stats.up_ahead > 0
        assert r.stats.peak_bytes <= budget and eng.xslot.mincore_bytes() <= budget
        assert not r._split and not r._split_down and not r.flight_table.any()  # nothing left half-read
        assert r.used == sum(r.leaf_cost(lay) for lay, _e in zip(*np.nonzero(r.state.resident), strict=True))
        ref = stock.greedy(src, LONG, n_tokens=4, n_batch=eng.n_batch, n_ubatch=eng.n_ubatch, n_ctx=1024,
                           n_threads=1, plain_experts=True)
    assert ref.tokens == tokens
    assert all(np.array_equal(a, b) for a, b in zip(ref.logits, logits, strict=True))
    assert read <= 1.1 * _expert_span_bytes(pack), (read, _expert_span_bytes(pack))


def test_the_stage_by_stage_comparison_can_fail(tiny_model, pack_of, monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: where the down node lets the gate/up parts go but reads no down parts,
    the down matmuls read zeros and the logits differ."""
    src, pack = tiny_model("qwen3moe", "f16"), pack_of("qwen3moe", "f16")
    budget = (_layer_budget(pack) + _whole_layer_budget(pack)) // 2
    with Engine(pack, budget=budget, n_ctx=1024, n_threads=1, profile=None) as eng:
        r = eng.residency
        real = r._fill_many
        monkeypatch.setattr(r, "_fill_many", lambda keys, stage, urgent: None if stage == 1 else real(keys, stage, urgent))
        gen = eng.generate(LONG, 1, keep_logits=True)
        assert r.stats.split_loads > 0
        ref = stock.greedy(src, LONG, n_tokens=1, n_batch=eng.n_batch, n_ubatch=eng.n_ubatch, n_ctx=1024,
                           n_threads=1, plain_experts=True)
    assert not np.array_equal(ref.logits[0], gen.logits[0])


def test_a_layers_resident_leaves_are_read_again_by_stage_where_they_leave_too_little_room(pack_of) -> None:
    """Where the resident leaves a micro-batch selects at a layer leave too little room for the
    gate/up parts of the rest, they are evicted and served stage by stage too; the budget holds."""
    pack = pack_of("qwen3moe", "f16")
    budget = (_layer_budget(pack) + _whole_layer_budget(pack)) // 2
    with Engine(pack, budget=budget, n_ctx=1024, n_threads=1, profile=None) as eng:
        r = eng.residency
        n_expert = eng.source.n_expert
        held = budget // r.leaf_cost(0)  # as many of layer 0's leaves as fit whole
        r.prefetch([(0, e) for e in range(held)], evict=False)
        r.drain()
        assert r.n_resident == held and held < n_expert
        r.on_experts(0, np.arange(n_expert).reshape(-1, 1))  # a micro-batch selects every expert
        assert r.stats.split_loads > n_expert - held and r.n_resident < held
        assert r.stats.peak_bytes <= budget
        r.finish_layer(0)
        assert r.stats.peak_bytes <= budget
        r.finish_all()
        assert not r.flight_table.any() and r.used == r.n_resident * r.leaf_cost(0)


def test_leaves_left_half_read_by_a_failed_graph_are_let_go_at_close(pack_of) -> None:
    """A layer served one stage at a time whose down node never came (a graph that failed): its
    gate/up parts are released at close, and the native pager stays closed."""
    pack = pack_of("qwen3moe", "f16")
    budget = (_layer_budget(pack) + _whole_layer_budget(pack)) // 2
    eng = Engine(pack, budget=budget, n_ctx=1024, n_threads=1, profile=None)
    r = eng.residency
    r.on_experts(0, np.arange(eng.source.n_expert).reshape(-1, 1))
    assert r._split and r.native is not None and not r.native.enabled  # the next gate goes to Python
    eng.close()
    assert not r._split and not r.flight_table.any() and r.used == r.n_resident * r.leaf_cost(0)
    assert not r.native.enabled


def _staged(fail: tuple[int, int, int] | None = None, layers: int = 1):  # noqa: ANN202 - (residency, fills)
    """A residency of ``layers`` layers of 8 leaves (gate/up parts 2 bytes, down 1) under 20
    bytes: a micro-batch selecting all 8 is served part by part, with room for 4 down parts beside
    the gate/up parts. ``fail``: the (layer, expert, stage) whose read raises."""
    import threading

    from smoe_gguf.residency import Residency

    fills: list[tuple[int, int, int | None]] = []
    lock = threading.Lock()

    def fill(layer: int, e: int, stage: int | None) -> None:
        if (layer, e, stage) == fail:
            raise OSError(f"layer {layer} expert {e}: bad down part")
        with lock:
            fills.append((layer, e, stage))

    r = Residency(dict.fromkeys(range(layers), 3), 8, budget=20, fill=fill, io_depth=2,
                  stage_cost=dict.fromkeys(range(layers), (2, 1)), release_stage=lambda keys, stage: None)
    r.split_prompts = r.down_ahead = r.up_ahead = True
    return r, fills


def test_a_part_by_part_layers_down_parts_that_fit_are_read_ahead_each_once() -> None:
    """The orchestrator reads ahead the down parts that fit beside a part-by-part layer's gate/up
    parts, evicting nothing; the down node reads the rest. Each part is read once, the budget
    holds throughout, and once the layer is computed nothing is charged or in flight."""
    r, fills = _staged()
    r.on_experts(0, np.arange(8).reshape(-1, 1))
    assert r.stats.split_loads == 8 and r.stats.down_ahead == 4 and r.used == 20
    r.finish_layer(0)
    assert r.used == 8 and r.stats.peak_bytes <= 20
    assert sorted(fills) == sorted([(0, e, 0) for e in range(8)] + [(0, e, 1) for e in range(8)])
    r.finish_all()
    assert r.used == 0 and not len(r.fetcher) and not r.flight_table.any() and not r.state.resident.any()
    r.close()


def test_down_parts_read_ahead_for_a_down_node_that_never_came_are_let_go() -> None:
    r, _fills = _staged()
    r.on_experts(0, np.arange(8).reshape(-1, 1))
    assert r.stats.down_ahead == 4
    r.finish_all()  # the graph ended (failed) before the down node
    assert r.used == 0 and not len(r.fetcher) and not r.flight_table.any()
    r.close()


@pytest.mark.parametrize("expert", [0, 6])  # read ahead (the I/O threads), or at the down node
def test_a_bad_down_part_of_a_part_by_part_layer_is_raised_and_nothing_stays_charged(expert: int) -> None:
    r, _fills = _staged(fail=(0, expert, 1))
    r.on_experts(0, np.arange(8).reshape(-1, 1))
    with pytest.raises(OSError, match=f"layer 0 expert {expert}: bad down part"):
        r.finish_layer(0)
    assert r.used == 0 and not len(r.fetcher) and not r.flight_table.any() and not r.fetcher.failed_down
    r.finish_all()
    assert r.used == 0
    r.close()


def _guess_layer_1(r, experts: range) -> None:  # noqa: ANN001 - a Residency
    """Layer 0's gate of a prompt guesses ``experts`` of layer 1 (as speculation would): a
    part-by-part prompt keeps the guess and queues nothing yet."""
    r.state.scan[0] = 1
    assert r.prefetch([(1, e) for e in experts], layer=0) == 0 and not len(r.fetcher)


def _ids(experts: range) -> np.ndarray:
    return np.array(list(experts)).reshape(-1, 1)


def test_the_next_layers_guessed_gate_up_parts_are_read_ahead_at_the_down_node_each_once() -> None:
    """At a part-by-part layer's down node, the gate/up parts of the next layer's guessed leaves
    that fit in the free room are queued (evicting nothing); the next gate takes those it selects
    and reads the rest. Each part is read once and the budget holds throughout."""
    r, fills = _staged(layers=2)
    _guess_layer_1(r, range(8))
    r.on_experts(0, _ids(range(8)))
    r.finish_layer(0)  # layer 0's 8 down parts in: 12 bytes free, 6 gate/up parts of layer 1
    assert r.stats.up_ahead == 6 and r.used == 20
    r.on_experts(1, _ids(range(7)))  # selects 6 read ahead and 1 more
    assert r.stats.up_ahead_used == 6 and r.stats.split_loads == 15 and r.stats.peak_bytes <= 20
    r.finish_layer(1)
    r.finish_all()
    want = [(0, e, s) for e in range(8) for s in (0, 1)] + [(1, e, s) for e in range(7) for s in (0, 1)]
    assert sorted(fills) == sorted(want)
    assert r.used == 0 and not len(r.fetcher) and not r.flight_table.any() and not r.state.resident.any()
    r.close()


def test_gate_up_parts_read_ahead_and_not_selected_are_let_go() -> None:
    r, fills = _staged(layers=2)
    _guess_layer_1(r, range(8))
    r.on_experts(0, _ids(range(8)))
    r.finish_layer(0)
    r.on_experts(1, _ids(range(1, 8)))  # 5 of the 6 read ahead, and 2 more: part by part
    assert r.stats.up_ahead == 6 and r.stats.up_ahead_used == 5 and r.stats.peak_bytes <= 20
    r.finish_layer(1)
    r.finish_all()
    assert sorted(f for f in fills if f[0] == 1 and f[2] == 1) == [(1, e, 1) for e in range(1, 8)]
    assert r.used == 0 and not len(r.fetcher) and not r.flight_table.any()
    r.close()


def test_gate_up_parts_read_ahead_for_a_layer_that_fits_whole_make_whole_leaves() -> None:
    """Where the next gate's leaves fit whole after all, those read ahead get their down parts
    (read by the I/O threads during the gate/up matmuls, awaited at the down node) and become
    resident, charged a whole leaf each; the unused ones go."""
    r, fills = _staged(layers=2)
    _guess_layer_1(r, range(8))
    r.on_experts(0, _ids(range(8)))
    r.finish_layer(0)
    r.on_experts(1, _ids(range(2)))
    assert r.used == 2 * 3 and r.state.node_wanted[1]
    r.finish_layer(1)
    assert r.state.resident[1, :2].all() and not r.state.resident[1, 2:].any()
    assert r.used == 2 * 3 and not r.flight_table.any()
    r.finish_all()
    assert sorted(f for f in fills if f[0] == 1 and f[1] < 2) == [(1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert r.used == 2 * 3 and r.stats.peak_bytes <= 20
    r.close()


@pytest.mark.parametrize("graph_ends", [False, True])
def test_gate_up_parts_read_ahead_for_a_gate_that_never_came_or_failed_leave_nothing_charged(graph_ends: bool) -> None:
    r, _fills = _staged(fail=None if graph_ends else (1, 0, 0), layers=2)
    _guess_layer_1(r, range(8))
    r.on_experts(0, _ids(range(8)))
    r.finish_layer(0)
    assert r.stats.up_ahead == 6
    if graph_ends:
        r.finish_all()  # the graph ended before layer 1's gate
    else:
        with pytest.raises(OSError, match="layer 1 expert 0"):
            r.on_experts(1, _ids(range(8)))
        r.finish_all()
    assert r.used == 0 and not len(r.fetcher) and not r.flight_table.any() and not r.fetcher.failed_down
    r.close()


def test_a_layer_that_fits_whole_in_a_part_by_part_prompt_reads_its_down_parts_during_its_matmuls() -> None:
    """In a prompt that may not fit whole, a layer whose leaves do fit whole reads their gate/up
    parts at the gate and their down parts on the I/O threads, awaited at its down node; then
    they are resident. Decode (one token) reads whole leaves at the gate."""
    r, fills = _staged(layers=2)
    r.state.scan[0] = 1
    r.on_experts(0, _ids(range(3)))  # 3 whole leaves fit
    assert r.state.node_wanted[0] and not r.state.resident.any() and r.used == 9
    r.finish_layer(0)
    assert r.state.resident[0, :3].all() and sorted(fills) == [(0, e, s) for e in range(3) for s in (0, 1)]
    r.finish_all()
    r.state.scan[0] = 0
    r.on_experts(1, _ids(range(1)))
    assert r.state.resident[1, 0] and (1, 0, None) in fills and r.used == 12
    r.close()
