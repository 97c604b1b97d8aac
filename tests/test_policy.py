"""Eviction policies on crafted access sequences, and trace record / replay."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from smoe_gguf.errors import SmoeError
from smoe_gguf.policy import POLICIES, AccessState, make_policy
from smoe_gguf.replay import replay
from smoe_gguf.residency import Residency
from smoe_gguf.trace import load

from .cli_helpers import run_cli
from .engine_helpers import PROMPT

A, B, C, D = 0, 1, 2, 3


def _books(policy: str, n_layer: int = 1, n_expert: int = 4, budget_leaves: int = 2) -> Residency:
    """A residency without I/O whose leaves cost 1 byte each."""
    return Residency({layer: 1 for layer in range(n_layer)}, n_expert, budget_leaves, policy)


def _resident(r: Residency, layer: int = 0) -> set[int]:
    return set(np.flatnonzero(r.state.resident[layer]).tolist())


def _gates(r: Residency, seq: list[tuple[int, list[int]]]) -> None:
    for layer, experts in seq:
        r.on_experts(layer, np.array(experts, np.int32))


def _resident_at(last_use: dict[tuple[int, int], int]) -> AccessState:
    """4 layers x 2 experts at clock 10, the given leaves resident and last used at those clocks."""
    s = AccessState.new(4, 2)
    s.clock[0] = 10
    for (layer, e), t in last_use.items():
        s.resident[layer, e] = 1
        s.last_use[layer, e] = t
    return s


def test_lru_evicts_the_leaf_used_longest_ago() -> None:
    r = _books("lru")
    _gates(r, [(0, [A]), (0, [B]), (0, [A]), (0, [C])])
    assert _resident(r) == {A, C}
    assert (r.stats.hits, r.stats.misses, r.stats.evictions) == (1, 3, 1)


def test_lfru_keeps_a_frequent_leaf_through_a_burst_that_lru_would_evict_it_for() -> None:
    seq = [(0, [A]), (0, [A]), (0, [A]), (0, [B]), (0, [C])]
    lru, lfru = _books("lru"), _books("lfru")
    _gates(lru, seq)
    _gates(lfru, seq)
    assert _resident(lru) == {B, C}  # A was least recent
    assert _resident(lfru) == {A, C}  # A's three uses outweigh B's one, slightly more recent


def test_lfru_lets_a_burst_of_uses_long_ago_fade() -> None:
    # A was used in a burst, then idle for six half-lives but for one use; B twice since. Counting
    # uses without decaying them would keep A (9 uses); their decayed sum keeps B.
    r = _books("lfru")
    _gates(r, [(0, [A])] * 8)
    r.state.clock[0] += 6 * int(r.state.half_life)
    _gates(r, [(0, [A]), (0, [B]), (0, [B]), (0, [C])])
    assert _resident(r) == {B, C}
    s = r.state
    assert s.freq[0, B] == pytest.approx(1 + 2 ** (-1 / s.half_life))  # one gate between B's uses


def test_lfru_counts_each_token_of_a_gate_that_picks_a_leaf() -> None:
    # One gate of three tokens, two experts each: A picked by all three, D by two, B by one.
    # Each token after the first adds TOKEN_WEIGHT, so C's miss evicts B, though all three were
    # used at the same gate.
    r = _books("lfru", budget_leaves=3)
    r.on_experts(0, np.array([[A, B], [A, D], [D, A]], np.int32))
    s = r.state
    assert s.token_weight > 0
    assert (s.freq[0, A], s.freq[0, D], s.freq[0, B]) == (1 + 2 * s.token_weight, 1 + s.token_weight, 1.0)
    _gates(r, [(0, [C])])
    assert _resident(r) == {A, C, D}


def test_least_stale_evicts_what_layer_order_needs_last() -> None:
    # Layer 1 is being gated; layers 2 and 3 come next, layer 1 itself only after a full pass.
    s = _resident_at({(1, 0): 10, (2, 0): 3, (3, 0): 9})
    evictable = s.resident.astype(bool)
    assert make_policy("lru").victim(s, evictable, 1) == (2, 0)  # oldest, yet needed next
    assert make_policy("least-stale").victim(s, evictable, 1) == (1, 0)
    evictable[1, 0] = False
    assert make_policy("least-stale").victim(s, evictable, 1) == (3, 0)


def test_lfru_evicts_in_layer_order_while_a_prompt_is_gated() -> None:
    # Layer 1 is being gated. By score, layer 2's leaf (used once, long ago) goes; in a prompt's
    # pass over the layers it is the one needed next, and layer 1's own other leaf goes instead.
    s = _resident_at({(1, 1): 10, (2, 0): 3, (3, 0): 9})
    s.freq[[1, 2, 3], [1, 0, 0]] = 1.0
    s.freq[1, 1] = 3.0
    evictable = s.resident.astype(bool)
    lfru = make_policy("lfru")
    assert lfru.victim(s, evictable, 1) == (2, 0)
    s.scan[0] = 1
    assert lfru.victim(s, evictable, 1) == make_policy("least-stale").victim(s, evictable, 1) == (1, 1)
    assert make_policy("lru").victim(s, evictable, 1) == (2, 0)  # the flag is lfru's alone


@pytest.mark.parametrize("policy", list(POLICIES))
def test_leaves_in_use_and_pinned_leaves_are_never_evicted(policy: str) -> None:
    r = _books(policy, n_expert=6, budget_leaves=3)
    r.state.pinned[0, D] = 1
    _gates(r, [(0, [D])])
    for experts in ([A, B], [C, A], [B, C], [E := 4, A], [5, E]):
        _gates(r, [(0, experts)])
        assert set(experts) <= _resident(r) and D in _resident(r)
        assert r.used <= r.budget
    with pytest.raises(SmoeError, match="cannot hold one layer's selected leaves"):
        _gates(r, [(0, [A, B, C])])  # three leaves + the pinned one in a budget of three


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(SmoeError, match="unknown policy 'mru': choose one of lru, lfru, least-stale"):
        make_policy("mru")


def test_trace_replays_deterministically_and_matches_the_live_run(pack_of, tmp_path: Path) -> None:
    pack = pack_of("qwen3moe", "f16")
    trace = tmp_path / "t.jsonl"
    # Reactive (no speculation, no profile): the live run's decisions are the policy's alone.
    code, stdout, stderr = run_cli("run", str(pack), "-p", PROMPT, "-n", "16", "--budget", "25%", "--policy", "lru",
                                   "--trace", str(trace), "--json", "--no-speculate", "--no-profile")
    assert code == 0, stderr
    live = json.loads(stdout)
    data = load(trace)
    assert data.header["n_expert_used"] == 4 and len(data.events) > 0
    # Every gate is in the trace (hits served by the C path included).
    assert data.live_hits == live["hits"] and data.live_accesses - data.live_hits == live["misses"]
    # Replay without a model, same budget, same policy: the same decisions as live.
    again = replay(data, live["budget_bytes"], "lru")
    assert (again.hits, again.misses) == (live["hits"], live["misses"])
    # ... layer by layer too, as the trace recorded each gate's hits
    recorded: dict[int, list[int]] = {}
    for line in trace.read_text().splitlines()[1:]:
        gate = json.loads(line)
        layer_counts = recorded.setdefault(gate["l"], [0, 0])
        layer_counts[0] += sum(gate["hit"])
        layer_counts[1] += len(gate["hit"]) - sum(gate["hit"])
    assert {layer: [h, m] for layer, (h, m) in enumerate(zip(again.layer_hits, again.layer_misses)) if h + m} == recorded
    assert replay(data, live["budget_bytes"], "lfru") == replay(data, live["budget_bytes"], "lfru")
    code, stdout, _ = run_cli("replay", str(trace), "--budget", "10%,25%,50%", "--json")
    rows = json.loads(stdout)
    assert code == 0 and len(rows) == 12  # 3 budgets x lru, lfru, least-stale, belady
    rates = {(r["budget"], r["policy"]): r["hit_rate"] for r in rows}
    for r in rows:  # the per-layer figures add up to the row's
        assert sum(b["hits"] for b in r["by_layer"]) == r["hits"] and sum(b["misses"] for b in r["by_layer"]) == r["misses"]
        assert [b["layer"] for b in r["by_layer"]] == sorted(recorded)
    assert rates[("50%", "lru")] >= rates[("10%", "lru")]


def test_replay_refuses_what_is_not_a_trace(tmp_path: Path) -> None:
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"hello": 1}\n')
    code, _, stderr = run_cli("replay", str(bad))
    assert code == 1 and "is not a smoe-gguf trace" in stderr
    code, _, stderr = run_cli("replay", str(tmp_path / "missing.jsonl"))
    assert code == 1 and "no such trace" in stderr
