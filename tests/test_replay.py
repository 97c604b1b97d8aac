"""Belady's MIN in trace replay: crafted sequences with answers worked out by hand, and never
fewer hits than an online policy, on random traces and on a trace recorded live."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from smoe_gguf.belady import Belady
from smoe_gguf.errors import SmoeError
from smoe_gguf.policy import POLICIES
from smoe_gguf.replay import REPLAY_POLICIES, replay
from smoe_gguf.residency import Residency
from smoe_gguf.trace import TraceData, load

from .cli_helpers import run_cli
from .engine_helpers import PROMPT

A, B, C, D = 0, 1, 2, 3


def _trace(n_layer: int, n_expert: int, n_used: int,
           batches: list[tuple[int, list[list[list[int]]]]]) -> TraceData:
    """A trace of micro-batches ``(n tokens, rows of each layer)``; every leaf costs 1 byte."""
    header = {"format": "smoe-trace", "version": 1, "n_layer": n_layer, "n_expert": n_expert,
              "n_expert_used": n_used, "leaf_cost": {str(layer): 1 for layer in range(n_layer)},
              "total_cost": n_layer * n_expert, "source": "test"}
    events, pos = [], 0
    for n, layers in batches:
        events += [(pos, n, layer, rows) for layer, rows in enumerate(layers)]
        pos += n
    return TraceData(header, events, 0, 0)


def _single_leaf_gates(seq: list[int], n_expert: int) -> TraceData:
    """One layer, one token per micro-batch, one expert per token."""
    return _trace(1, n_expert, 1, [(1, [[[e]]]) for e in seq])


# The textbook reference string (Silberschatz et al., "Operating System Concepts", page
# replacement): with 3 frames, the optimal algorithm faults 9 times and LRU 12 times.
TEXTBOOK = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]


def test_belady_on_the_textbook_reference_string() -> None:
    data = _single_leaf_gates(TEXTBOOK, 8)
    opt = replay(data, 3, "belady")
    assert (opt.hits, opt.misses, opt.evictions, opt.bytes_loaded) == (11, 9, 6, 9)
    lru = replay(data, 3, "lru")
    assert (lru.hits, lru.misses, lru.evictions) == (8, 12, 9)
    assert opt.event_misses == [1, 1, 1, 1, 0, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0]


def test_belady_evicts_the_leaf_used_furthest_ahead() -> None:
    # Room for two. At C, A is needed again next and B much later: B goes, A stays.
    data = _single_leaf_gates([A, B, C, A, C, A, B], 4)
    opt = replay(data, 2, "belady")
    # A B C(evict B) A C A B(evict A or C: neither is used again)
    assert (opt.hits, opt.misses, opt.evictions) == (3, 4, 2)
    assert replay(data, 2, "lru").misses == 5  # LRU evicts A at C (used longest ago), and pays for it


def _books(gates: list[tuple[int, list[int]]], n_expert: int, budget_leaves: int) -> Residency:
    r = Residency({0: 1}, n_expert, budget_leaves, "lru")
    r.policy = Belady(gates, 1, n_expert)
    return r


def test_belady_never_evicts_a_leaf_of_the_gate_being_served() -> None:
    # Room for two. At gate [A, B], A is never used again and C is: unprotected MIN would evict
    # A to load B, but A is read by the same matmul, so C must go.
    gates = [(0, [C]), (0, [A, B]), (0, [C])]
    r = _books(gates, 4, 2)
    r.on_experts(0, np.array([C], np.int32))
    r.on_experts(0, np.array([A, B], np.int32))
    assert set(np.flatnonzero(r.state.resident[0]).tolist()) == {A, B}
    r.on_experts(0, np.array([C], np.int32))
    assert (r.stats.hits, r.stats.misses, r.stats.evictions) == (0, 4, 2)


def test_belady_with_gates_of_several_leaves() -> None:
    # Room for three: [A,B] [C,D] [A,C] [B,D]. At D, A and B may go (C, D in use); A is needed
    # next, so B goes. Then A, C hit; at B, A or C goes (neither is used again), D hits.
    data = _trace(1, 4, 2, [(1, [[[A, B]]]), (1, [[[C, D]]]), (1, [[[A, C]]]), (1, [[[B, D]]])])
    opt = replay(data, 3, "belady")
    assert (opt.hits, opt.misses, opt.evictions) == (3, 5, 2)
    assert opt.event_hits == [0, 0, 2, 1] and opt.event_misses == [2, 2, 0, 1]
    assert replay(data, 3, "lru").misses == 6


def test_belady_follows_the_micro_batch_recut() -> None:
    # One micro-batch of 3 tokens x 2 experts. With room for 2 or 3 leaves the engine would cut it
    # into 1-token micro-batches, with room for 4 into 2 + 1 tokens; replay cuts it the same way.
    data = _trace(1, 8, 2, [(3, [[[A, B], [C, D], [A, B]]])])
    assert replay(data, 2, "belady").misses == 6  # [A,B] [C,D] [A,B]: nothing survives
    assert replay(data, 3, "belady").misses == 5  # one of A, B stays through [C,D]
    res = replay(data, 4, "belady")  # [A,B,C,D] then [A,B]
    assert (res.hits, res.misses, res.evictions) == (2, 4, 0)


def test_replay_knows_belady_and_refuses_an_unknown_policy() -> None:
    assert REPLAY_POLICIES == (*POLICIES, "belady")
    with pytest.raises(SmoeError, match="unknown policy 'mru': choose one of lru, lfru, least-stale, belady"):
        replay(_single_leaf_gates([A], 4), 2, "mru")


def _random_trace(seed: int) -> TraceData:
    """Skewed (Zipf-like) routing over a few layers: prompt micro-batches, then decode tokens."""
    rng = np.random.default_rng(seed)
    n_layer, n_expert, n_used = int(rng.integers(1, 4)), int(rng.integers(6, 13)), int(rng.integers(1, 3))
    weights = 1.0 / np.arange(1, n_expert + 1) ** rng.uniform(0.5, 1.5)
    batches = []
    for _prompt in range(2):
        for n in [int(rng.integers(2, 7))] + [1] * int(rng.integers(10, 30)):
            layers = []
            for _layer in range(n_layer):
                perm = rng.permutation(n_expert)  # each layer ranks the experts its own way
                rows = [perm[rng.choice(n_expert, n_used, replace=False, p=weights / weights.sum())].tolist()
                        for _ in range(n)]
                layers.append(rows)
            batches.append((n, layers))
    return _trace(n_layer, n_expert, n_used, batches)


@pytest.mark.parametrize("seed", range(40))
def test_belady_is_never_below_an_online_policy_on_random_traces(seed: int) -> None:
    data = _random_trace(seed)
    n_used, total = int(data.header["n_expert_used"]), data.total_cost
    for budget in sorted({n_used, n_used + 1, total // 4, total // 2, total - 1}):
        if budget < n_used:
            continue
        opt = replay(data, budget, "belady")
        for policy in POLICIES:
            other = replay(data, budget, policy)
            assert opt.hits + opt.misses == other.hits + other.misses
            assert opt.misses <= other.misses, (budget, policy)


def test_belady_is_never_below_an_online_policy_on_a_live_trace(pack_of: Callable[[str, str], Path], tmp_path: Path) -> None:
    pack = pack_of("qwen3moe", "f16")
    trace = tmp_path / "t.jsonl"
    code, stdout, stderr = run_cli("run", str(pack), "-p", PROMPT, "-n", "24", "--budget", "25%", "--temp", "0.8",
                                   "--seed", "3", "--trace", str(trace), "--json", "--no-speculate", "--no-profile")
    assert code == 0, stderr
    data = load(trace)
    assert len(data.events) > 24
    code, stdout, _ = run_cli("replay", str(trace), "--budget", "10%,25%,50%,100%", "--json")
    assert code == 0
    rows = json.loads(stdout)
    assert {r["policy"] for r in rows} == set(REPLAY_POLICIES)
    misses = {(r["budget"], r["policy"]): r["misses"] for r in rows}
    for budget in ("10%", "25%", "50%", "100%"):
        for policy in POLICIES:
            assert misses[(budget, "belady")] <= misses[(budget, policy)], (budget, policy)
    # below 100% the trace leaves MIN something to choose: it misses strictly less than LRU somewhere
    assert any(misses[(b, "belady")] < misses[(b, "lru")] for b in ("10%", "25%", "50%"))


def test_a_trace_line_says_whether_a_prompt_gated_it(tmp_path: Path) -> None:
    """``"p"`` as recorded; a trace recorded before it existed reads micro-batches of several
    tokens as a prompt's; anything but 0 or 1 is refused, naming the line."""
    header = {"format": "smoe-trace", "version": 1, "n_layer": 1, "n_expert": 4, "n_expert_used": 1,
              "leaf_cost": {"0": 1}, "total_cost": 4, "source": "test"}
    lines = [{"pos": 0, "n": 2, "l": 0, "ids": [[0], [1]], "e": [0, 1], "hit": [0, 0], "p": 0},
             {"pos": 2, "n": 1, "l": 0, "ids": [[2]], "e": [2], "hit": [0], "p": 1},
             {"pos": 3, "n": 2, "l": 0, "ids": [[0], [3]], "e": [0, 3], "hit": [1, 0]},
             {"pos": 5, "n": 1, "l": 0, "ids": [[1]], "e": [1], "hit": [0]}]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [header, *lines]) + "\n")
    assert load(path).prompt == [False, True, True, False]
    lines[1]["p"] = 2
    path.write_text("\n".join(json.dumps(x) for x in [header, *lines]) + "\n")
    with pytest.raises(SmoeError, match=r"t\.jsonl:3: malformed trace line \(p is 2, expected an integer in \[0, 1\]\)"):
        load(path)
