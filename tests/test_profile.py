"""The tree-map profile: evidence, tree, persistence (corrupt / foreign / old files, concurrent
writers), and its use by the engine (warm start, pinning) without changing a single logit."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from smoe_gguf import profile as tm
from smoe_gguf.engine import Engine
from smoe_gguf.source import model_identity

from .cli_helpers import run_cli
from .engine_helpers import N_TOKENS, PROMPT, reference, same

N_LAYER, N_EXPERT = 4, 8


def _win(*leaves: tuple[int, int]) -> dict[int, float]:
    return {layer * N_EXPERT + e: 1.0 for layer, e in leaves}


def _groups() -> list[dict[int, float]]:
    code = [_win((0, 0), (0, 1), (1, 0), (2, 0), (3, 0)) for _ in range(6)]
    prose = [_win((0, 5), (0, 6), (1, 5), (2, 5), (3, 5)) for _ in range(6)]
    return code + prose


def test_tree_separates_leaves_that_fire_together_and_a_prompt_finds_its_branch() -> None:
    prof = tm.Profile.empty("m", N_LAYER, N_EXPERT)
    prof.merge(_groups())
    assert prof.tree is not None and len(prof.tree.children) >= 2
    for child in prof.tree.children:
        experts = {e for _l, e, _s in child.leaves}
        assert experts <= {0, 1} or experts <= {5, 6}, "a branch mixes the two groups"
    counts = np.zeros((N_LAYER, N_EXPERT))
    counts[0, 5] = counts[1, 5] = 3  # the prompt's first two layers chose the "prose" leaves
    branch = prof.branch_for(counts, 2)
    assert branch is not None and (3, 5) in {(l, e) for l, e, _s in branch.leaves}
    assert (3, 0) not in {(l, e) for l, e, _s in branch.leaves}
    assert prof.hottest(2) == [(0, 0), (0, 1)] or set(prof.hottest(2)) <= {(0, 0), (0, 1), (0, 5), (0, 6)}


def test_recorder_counts_gates_it_did_not_observe() -> None:
    """With observers paused (decode found faster without them) the gates still count: the
    recorder takes them from the gate's per-leaf counters at the next cut."""
    from smoe_gguf.residency import Residency

    r = Residency({layer: 1 for layer in range(N_LAYER)}, N_EXPERT, budget=N_LAYER * N_EXPERT)
    rec = tm.Recorder(r, None, N_EXPERT)
    for layer in range(N_LAYER):  # one observed token: the gate selects, then the observer sees
        ids = np.array([[5]], np.int32)
        r.on_experts(layer, ids)
        rec(layer, 0, ids)
    for _ in range(tm.WINDOW_TOKENS):  # unobserved tokens: only the gate runs
        for layer in range(N_LAYER):
            r.on_experts(layer, np.array([[2]], np.int32))
        rec.token_unobserved()
    # the window ended after WINDOW_TOKENS tokens, observed or not; nothing counted twice
    assert len(rec.windows) == 1
    assert rec.windows[0] == {layer * N_EXPERT + e: n for layer in range(N_LAYER)
                              for e, n in ((5, 1.0), (2, tm.WINDOW_TOKENS - 1.0))}
    rec.cut()
    assert rec.windows[1] == {layer * N_EXPERT + 2: 1.0 for layer in range(N_LAYER)}


def test_recorder_on_a_model_whose_first_and_some_later_layers_have_no_experts() -> None:
    """deepseek2 / llama4 layouts: tokens are counted at the first layer with experts, windows
    cut at the last one, and the prompt's branch is chosen at the PROMPT_LAYERS-th of them."""
    from smoe_gguf.residency import Residency

    paged = [1, 3, 5]  # layers 0, 2 and 4 are dense: never gated
    r = Residency({layer: 1 for layer in paged}, N_EXPERT, budget=len(paged) * N_EXPERT)
    rec = tm.Recorder(r, None, N_EXPERT)
    assert rec._prompt_layer == paged[tm.PROMPT_LAYERS - 1]
    for _ in range(tm.WINDOW_TOKENS):
        for layer in paged:
            ids = np.array([[layer]], np.int32)
            r.on_experts(layer, ids)
            rec(layer, 0, ids)
    assert rec.windows == [{layer * N_EXPERT + layer: float(tm.WINDOW_TOKENS) for layer in paged}]
    assert r.prefetch([(0, 1), (2, 3)]) == 0  # leaves of layers without experts are never fetched


def test_old_evidence_decays() -> None:
    prof = tm.Profile.empty("m", N_LAYER, N_EXPERT)
    prof.merge([_win((0, 0))])
    prof.merge([_win((0, 1))])
    assert prof.usage[0, 0] == pytest.approx(tm.DECAY) and prof.usage[0, 1] == pytest.approx(1.0)
    assert [w for w, _ in prof.windows] == pytest.approx([tm.DECAY, 1.0])
    for _ in range(40):  # weights below MIN_WEIGHT are dropped
        prof.merge([_win((0, 2))])
    assert all(w >= tm.MIN_WEIGHT for w, _ in prof.windows) and len(prof.windows) < 42


@pytest.mark.parametrize("content,message,replaced", [
    ("{not json", "is corrupt", True),
    ('{"format": "smoe-profile", "version": 99}', "is version 99", True),
    ('{"format": "smoe-profile", "version": 1, "model": "other", "n_layer": 4, "n_expert": 8}',
     "belongs to another model", False),
    ('{"format": "smoe-profile", "version": 1, "model": "m", "n_layer": 4, "n_expert": 8, "usage": [1]}',
     "is corrupt", True),
])
def test_a_bad_profile_is_ignored_with_a_warning(tmp_path: Path, content: str, message: str, replaced: bool) -> None:
    path = tmp_path / "p.json"
    path.write_text(content)
    warnings: list[str] = []
    prof, writable = tm.load(path, "m", N_LAYER, N_EXPERT, warnings.append)
    assert len(warnings) == 1 and message in warnings[0] and not prof.usage.any() and writable == replaced
    tm.save(path, "m", N_LAYER, N_EXPERT, [_win((0, 0))], warnings.append)
    if replaced:
        assert json.loads(path.read_text())["model"] == "m"
    else:
        assert path.read_text() == content and "not saved" in warnings[-1]


def _writer(path: str, k: int) -> None:
    for i in range(10):
        tm.save(Path(path), "m", N_LAYER, N_EXPERT, [_win((k, i % N_EXPERT))], lambda _m: None)


def test_two_processes_saving_at_once_both_count(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), k)) for k in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    prof, _ = tm.load(path, "m", N_LAYER, N_EXPERT, pytest.fail)
    assert prof.sessions == 20 and len(prof.windows) == 20
    assert prof.usage[0].sum() > 0 and prof.usage[1].sum() > 0
    assert not list(tmp_path.glob("*.tmp"))


def test_engine_learns_warms_and_pins_bit_exact(tiny_model, pack_of, tmp_path: Path) -> None:
    src, pack = tiny_model("qwen2moe", "f16"), pack_of("qwen2moe", "f16")
    path = _learnt_profile(pack, tmp_path)
    model_id, n_layer, n_expert = model_identity(pack)
    prof, _ = tm.load(path, model_id, n_layer, n_expert, pytest.fail)
    assert prof.tree is not None and prof.sessions == 1
    pin = 6
    # a budget that holds a layer's leaves beside the pins (below, a prompt takes leaves one stage at
    # a time, and nothing is warmed: test_no_warm_start_where_prompts_go_one_stage_at_a_time)
    with Engine(pack, budget="50%", n_ctx=256, n_threads=2, profile=path, pin=pin) as eng:
        r = eng.residency
        assert eng.paging and not r.split_prompts
        assert int(r.state.pinned.sum()) == pin
        assert all(r.state.resident[k] for k in prof.hottest(pin))  # pinned and loaded at start
        r.drain()
        assert r.stats.prefetched > pin  # the profile warmed more leaves in the background
        gen = eng.generate(PROMPT, N_TOKENS, keep_logits=True)
        assert all(r.state.resident[k] for k in prof.hottest(pin)), "a pinned leaf was evicted"
        assert r.used <= r.budget and eng.xslot.mincore_bytes() <= r.budget
        assert same(reference(src, eng), gen.tokens, gen.logits)
    prof2, _ = tm.load(path, model_id, n_layer, n_expert, pytest.fail)
    assert prof2.sessions == 2  # the run itself was learnt at close
    code, stdout, _ = run_cli("profile", str(pack), "--show", "--profile", str(path))
    assert code == 0 and "tree-map" in stdout and "branch" in stdout


def test_no_warm_start_where_prompts_go_one_stage_at_a_time(pack_of, tmp_path: Path) -> None:
    pack = pack_of("qwen2moe", "f16")
    path = tmp_path / "prof.json"
    code, _, stderr = run_cli("profile", str(pack), "--prompts", str(_prompts(tmp_path)), "-n", "4",
                              "--profile", str(path))
    assert code == 0, stderr
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=path) as eng:
        r = eng.residency
        assert eng.profile is not None and r.split_prompts
        r.drain()
        assert r.stats.prefetched == 0 and "warm-start" not in r.stats.by_source


def _learnt_profile(model: Path, tmp_path: Path) -> Path:
    """A profile learnt by `smoe-gguf profile MODEL --prompts ...` (8 tokens a prompt)."""
    path = tmp_path / "prof.json"
    code, _, stderr = run_cli("profile", str(model), "--prompts", str(_prompts(tmp_path)), "-n", "8",
                              "--profile", str(path))
    assert code == 0, stderr
    return path


def _prompts(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.txt"
    p.write_text("def fibonacci(n):\nThe history of the Roman empire\nint main(void) { return 0; }\n"
                 "SELECT name FROM users;\nOnce upon a time, in a land far away\nimport numpy as np\n")
    return p


def test_a_budget_that_holds_every_leaf_does_not_read_the_profile(pack_of, tmp_path: Path) -> None:
    """Nothing is warmed, pinned or learnt where every leaf fits: the profile is not read (a
    corrupt one gives no warning), unless --pin asks for it."""
    pack = pack_of("qwen2moe", "f16")
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with Engine(pack, budget="100%", n_ctx=256, n_threads=2, profile=path) as eng:
        assert eng.profile is None and eng.recorder is None and eng.warnings == []
        assert eng.save_profile() is None
    assert path.read_text() == "{not json"
    with Engine(pack, budget="100%", n_ctx=256, n_threads=2, profile=path, pin=2) as eng:
        assert eng.profile is not None and any("is corrupt" in w for w in eng.warnings)


def test_a_profile_learnt_on_a_gguf_serves_its_pack(tiny_model, pack_of, tmp_path: Path) -> None:
    """What `run model.gguf` learnt is read, without a warning, by `run` of the split pack."""
    src, pack = tiny_model("qwen2moe", "f16"), pack_of("qwen2moe", "f16")
    path = _learnt_profile(src, tmp_path)
    with Engine(pack, budget="50%", n_ctx=256, n_threads=2, profile=path) as eng:
        assert eng.warnings == []
        assert eng.profile is not None and eng.profile.sessions == 1
