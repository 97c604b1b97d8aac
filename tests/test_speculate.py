"""Prediction that pays: guesses by rank for the next two layers, a protect set eviction honours,
prefetches ordered by their chance of use and held behind the gate's own reads, a cost model
that skips guesses not worth their read, and the stall prefetches save."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from smoe_gguf import residency, route_fit, speculate, token_guess, token_memo
from smoe_gguf.engine import Engine
from smoe_gguf.fetcher import HOLD_BELOW, QUEUED, Fetcher
from smoe_gguf.residency import Residency
from smoe_gguf.route_fit import RouteFit, top_recall

from .cli_helpers import run_cli
from .engine_helpers import N_TOKENS, PROMPT, reference, same


def _books(costs: dict[int, int], n_expert: int, budget: int) -> Residency:
    """A residency without I/O (reads do nothing), under LRU."""
    return Residency(costs, n_expert, budget, "lru")


def _gate(r: Residency, layer: int, *experts: int) -> None:
    r.on_experts(layer, np.array([list(experts)], np.int32))


def _resident(r: Residency) -> set[tuple[int, int]]:
    return {(int(a), int(b)) for a, b in zip(*np.nonzero(r.state.resident))}


# ---------------------------------------------------------------------- the I/O thread


def _blocked_fetcher() -> tuple[Fetcher, list[tuple[int, int]], threading.Event, dict[tuple[int, int], threading.Event]]:
    """A fetcher whose first read, (9, 9), blocks until ``release`` is set; ``landed[key]`` is set
    when a prefetch lands; reads are logged in order."""
    order: list[tuple[int, int]] = []
    started, release = threading.Event(), threading.Event()
    landed: dict[tuple[int, int], threading.Event] = {}

    def fill(layer: int, e: int, _stage: int | None) -> None:
        if (layer, e) == (9, 9):
            started.set()
            assert release.wait(10)
        order.append((layer, e))

    def on_landed(key: tuple[int, int], _priority: float) -> None:
        landed.setdefault(key, threading.Event()).set()

    f = Fetcher(fill, on_landed)
    f.prefetch((9, 9), 1.0)
    assert started.wait(10)  # the worker is inside the first read: what follows only queues
    return f, order, release, landed


def test_prefetches_are_read_likeliest_first_and_the_least_likely_is_cancelled_first() -> None:
    f, order, release, _ = _blocked_fetcher()
    for e, p in ((1, 0.2), (2, 0.9), (3, 0.5), (4, 0.2)):
        f.prefetch((0, e), p)
    assert f.queued == 4
    assert f.cancel_least() == (0, 4)  # the least likely; the newest of two equals
    assert (0, 4) not in f and f.queued == 3
    assert f.claim((0, 3))  # a gate takes a queued one back: it is read by the gate instead
    release.set()
    f.drain()
    assert order == [(9, 9), (0, 2), (0, 1)]
    f.close()


def test_unlikely_prefetches_wait_while_the_gate_reads_a_miss_itself() -> None:
    f, order, release, landed = _blocked_fetcher()
    high, low = (0, 1), (0, 2)
    landed[high] = threading.Event()
    with f.gate_reads():
        f.prefetch(low, HOLD_BELOW / 2)
        f.prefetch(high, HOLD_BELOW)
        release.set()
        assert landed[high].wait(10)  # a likely guess is read even now
        assert f.state(low) == QUEUED  # an unlikely one waits for the gate's read to end
    f.drain()
    assert order == [(9, 9), high, low]
    f.close()


# ---------------------------------------------------------------------- the protect set


def test_protected_leaves_are_evicted_last_and_never_for_a_prefetch() -> None:
    r = _books({0: 1, 1: 1}, 4, budget=3)
    _gate(r, 0, 0)
    _gate(r, 0, 1)
    _gate(r, 1, 0)
    r.state.protect[0, 0] = 1  # LRU's first victim, but predicted
    _gate(r, 1, 1)
    assert _resident(r) == {(0, 0), (1, 0), (1, 1)}  # (0, 1) went instead
    # a prefetch may evict what is neither in use nor protected ...
    assert r.prefetch([(1, 2)], layer=1, in_use=[1]) == 1
    r.drain()
    assert _resident(r) == {(0, 0), (1, 1), (1, 2)}
    # ... and nothing else: (1, 1) is in use, (1, 2) and (0, 0) protected
    r.state.protect[1, 2] = 1
    assert r.prefetch([(1, 3)], layer=1, in_use=[1]) == 0
    # a gate takes protected leaves when nothing else can go, and clears its own layer's marks
    _gate(r, 1, 0, 1, 3)
    assert _resident(r) == {(1, 0), (1, 1), (1, 3)}
    assert r.stats.protect_dropped == 1 and not r.state.protect[1].any()
    r.close()


def test_stall_saved_counts_prefetches_used_and_regret_counts_evictions_missed_soon() -> None:
    r = _books({0: 1, 1: 1}, 4, budget=2)
    _gate(r, 0, 0)  # a gate load: the measured cost of a miss
    per_load = r.stats.seconds_per_load
    assert per_load > 0
    assert r.prefetch([(1, 1)], layer=0, in_use=[0], priority=0.9, source="test") == 1
    r.drain()
    _gate(r, 1, 1)  # a hit on the prefetched leaf
    c = r.stats.by_source["test"]
    assert (c.queued, c.used, c.wasted) == (1, 1, 0)
    assert c.stall_saved_seconds == pytest.approx(per_load)
    # a prefetch evicted unused is wasted, and saves nothing
    assert r.prefetch([(1, 2)], layer=1, in_use=[1], priority=0.9, source="test") == 1
    r.drain()
    assert r.stats.evictions == 1  # (0, 0) made room
    _gate(r, 1, 1)  # (1, 1) used again: the unused (1, 2) is now the least recent
    _gate(r, 0, 3)  # evicts the unused (1, 2): wasted
    assert c.wasted == 1 and c.used == 1
    # (0, 0) was evicted two gates ago: missing it now is a regret
    regrets = r.stats.regrets
    _gate(r, 0, 0)
    assert r.stats.regrets == regrets + 1
    assert 0 < r.eviction_regret() < 1
    r.close()


def test_a_prefetch_the_c_path_used_is_credited_when_evicted() -> None:
    r = _books({0: 1}, 4, budget=2)
    _gate(r, 0, 0)
    r.prefetch([(0, 1)], layer=0, in_use=[0], source="test")
    r.drain()
    r.state.last_use[0, 1] = r.state.tick()  # what the C gate writes on a hit
    _gate(r, 0, 2)
    _gate(r, 0, 3)  # both earlier leaves are evicted
    c = r.stats.by_source["test"]
    assert (c.used, c.wasted) == (1, 0)
    r.close()


# ---------------------------------------------------------------------- the speculator, live


def test_guesses_by_rank_for_two_layers_ahead_bit_exact(tiny_model, pack_of, monkeypatch) -> None:
    monkeypatch.setattr(residency, "READ_COST", 0.0)  # every guess is prefetched: many reach a gate
    monkeypatch.setattr(residency, "AHEAD_COST", 0.0)
    src, pack = tiny_model("qwen3moe", "f32"), pack_of("qwen3moe", "f32")
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None) as eng:
        eng.observer_switch.keep(True)  # observe every token (no pause to measure)
        gen = eng.generate(PROMPT, N_TOKENS, keep_logits=True)
        assert same(reference(src, eng), gen.tokens, gen.logits)
        spec = eng.stats().speculation
        assert spec is not None
        n_used, n_expert, layers = eng.source.n_expert_used, eng.source.n_expert, sorted(eng.residency.costs)
        assert spec["rank"] == round(speculate.DEFAULT_RANK * n_used)
        one, two = spec["lookaheads"]["1"], spec["lookaheads"]["2"]
        assert sorted(one["per_layer"]) == layers[1:] and sorted(two["per_layer"]) == layers[2:]
        # one guess per layer ahead, per decoded token that had one
        assert one["scored"] == (N_TOKENS - 1) * (len(layers) - 1)
        assert two["scored"] == (N_TOKENS - 1) * (len(layers) - 2)
        for la in (one, two):
            ranks = sorted(la["by_rank"], key=int)
            recalls = [la["by_rank"][k]["recall"] for k in ranks]
            assert recalls == sorted(recalls)  # more guesses, more found
            top_k = la["by_rank"][str(n_used)]
            assert top_k["precision"] == top_k["recall"]  # k guessed, k picked
            assert top_k["recall"] > 1.5 * n_used / n_expert  # the router's guess beats chance
        src_counts = eng.stats().prefetch_by_source["speculation"]
        # a gate needed some of them: used (landed, or waited for), or taken back while still
        # queued (which of the two is a race between the readers and a tiny model's compute)
        assert spec["prefetched"] == src_counts["queued"] > 0 and src_counts["used"] + src_counts["claimed"] > 0
        assert not eng.residency.state.protect.any()  # every guessed layer was served


@pytest.mark.parametrize(("arch", "ftype"), [("qwen3moe", "f32"), ("deepseek2", "f16"), ("gpt-oss", "f16")])
def test_decoded_tokens_guessed_in_c_are_scored_exactly_as_in_python(arch, ftype, tiny_model, pack_of) -> None:
    """The C path (spec_native, the default) guesses what the Python observer does: the same ranks,
    scored the same, with each architecture's gating (softmax; sigmoid with a selection bias; a
    router bias), the route fits included; the output stays bit-exact. Control: the Python path
    guesses none in C."""
    src, pack = tiny_model(arch, ftype), pack_of(arch, ftype)
    runs = {}
    for in_c in (True, False):
        with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None, speculate_native=True) as eng:
            eng.observer_switch.keep(True)
            native, spec = eng.spec_native, eng.speculator
            assert native is not None and spec is not None
            if not in_c:
                native.ready = lambda: False  # type: ignore[method-assign]  # the Python observer guesses
            gen = eng.generate(PROMPT, N_TOKENS, keep_logits=True)
            assert same(reference(src, eng), gen.tokens, gen.logits)
            summary = eng.stats().speculation
            assert summary is not None and summary["native_unlocated"] == 0
            counts = []
            for st in spec.stats.lookahead.values():
                st.flush()
                counts += [st.rank_hits.copy(), st.scored.copy(), st.per_layer.copy(), st.by_threshold.copy()]
            runs[in_c] = (native.guessed, spec.stats.guesses, counts, sorted(spec.fit.fits))
    (c_gates, c_guesses, c_counts, c_pairs), (py_gates, py_guesses, py_counts, py_pairs) = runs[True], runs[False]
    assert c_gates > 0 and py_gates == 0
    assert c_guesses == py_guesses and c_pairs == py_pairs
    assert sum(int(x.sum()) for x in c_counts) > 0
    for x, y in zip(c_counts, py_counts, strict=True):
        assert np.array_equal(x, y)
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None) as eng:
        assert eng.speculator is not None and eng.spec_native is not None  # on by default
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None, speculate_native=False) as eng:
        assert eng.speculator is not None and eng.spec_native is None


def test_speculation_in_c_guesses_every_decoded_token_whatever_the_observer_switch(pack_of) -> None:
    """The C path guesses at every gate of every decoded token: the observer switch, which pauses
    Python's observers where they cost more than they save, does not turn it off. Control: the
    switch's pause stops Python's speculation."""
    pack = pack_of("qwen3moe", "f32")
    for in_c in (True, False):
        with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None, speculate_native=in_c) as eng:
            eng.observer_switch.keep(False)  # as after a verdict that the observers do not pay
            spec = eng.speculator
            assert spec is not None
            gen = eng.generate(PROMPT, N_TOKENS)
            decoded = len(gen.tokens) - 1  # the last token sampled is not decoded
            guessing = sum(1 for targets in spec.ahead.values() if targets)  # gates per token (the last guesses none)
            if in_c:
                assert eng.spec_native is not None
                assert spec.stats.guesses == eng.spec_native.guessed == decoded * guessing > 0
            else:  # the token after the prompt is observed as the prompt was, then the switch holds
                assert spec.stats.guesses == guessing


def test_a_decoded_token_calls_no_observer_that_acts_on_prompts_only(pack_of) -> None:
    """Prompt read-ahead (the observer where speculation is off) acts on prompt micro-batches
    only: with the observers held on, a decoded token's gates still stay in C (no call into
    Python for them), and the prompt's gates call it. Control: speculation in Python, held on,
    is called at decoded tokens' gates."""
    pack = pack_of("qwen3moe", "f32")
    for guessing in (False, True):
        with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None, speculate=guessing,
                    speculate_native=False) as eng:
            eng.observer_switch.keep(True)  # the observers on at every token
            rows: list[int] = []
            observer = eng.gate.observers[0]

            def counted(layer: int, node: int, ids: np.ndarray, rows: list[int] = rows, observer=observer) -> None:
                rows.append(len(ids))
                observer(layer, node, ids)

            eng.gate.observers[0] = counted
            steps = eng.stream(PROMPT, N_TOKENS)
            next(steps)  # the prompt, and its first token
            assert any(n > 1 for n in rows)  # the prompt's micro-batches
            rows.clear()
            assert len(list(steps)) == N_TOKENS - 1
            assert bool(rows) == guessing  # decoded tokens' gates
            assert eng.gate.observes_decode == guessing


def test_a_guess_not_worth_its_read_is_not_prefetched(pack_of, monkeypatch) -> None:
    pack = pack_of("qwen3moe", "f32")
    monkeypatch.setattr(residency, "READ_COST", 1.01)  # no decoded token's guess can be likelier than that
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None) as eng:
        chances: list[float] = []
        _spy_prefetches(eng.residency, chances)  # speculation is the only asker here (no profile)
        prompt = eng.tokenize(PROMPT)
        eng.decode(prompt)
        # a micro-batch's next layer: only a wasted read costs the bar, so what is read is likelier
        # than bar / (1 + bar)
        assert chances and min(chances) >= 1.01 / 2.01
        before = dict(eng.stats().speculation)
        for tok in prompt[:6]:
            eng.decode([tok])
        spec = eng.stats().speculation
        assert spec["guesses"] > before["guesses"]
        assert spec["prefetched"] == before["prefetched"] and spec["protected"] == before["protected"]
        assert spec["below_cost"] > before["below_cost"]


@pytest.mark.parametrize("in_c", [True, False])
def test_a_guess_two_layers_ahead_is_prefetched_only_past_the_ahead_cost(in_c, pack_of, monkeypatch) -> None:
    """A guess for a layer beyond the next one is protected at the plain bar but prefetched only
    where its chance of use also reaches AHEAD_COST more (the next layer's gate guesses it again).
    Control: with no extra cost, some prefetches are for the layer after the next one."""
    pack = pack_of("qwen3moe", "f32")
    monkeypatch.setattr(residency, "READ_COST", 0.0)
    ahead_of: dict[float, list[int]] = {}
    for extra in (0.0, 1.01):  # the control, then no chance of use can pay that
        monkeypatch.setattr(residency, "AHEAD_COST", extra)
        with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None, speculate_native=in_c) as eng:
            eng.observer_switch.keep(True)
            r = eng.residency
            assert r.native is not None
            r.native.enabled = False  # the C path's choices come to Residency.prefetch (spied), not the pager
            layers = sorted(r.costs)
            asked: list[tuple[int, list[tuple[int, int]]]] = []
            _spy_prefetches(r, gated=asked)
            prompt = eng.tokenize(PROMPT)
            eng.decode(prompt)
            asked.clear()  # a prompt's micro-batches guess the next layer only
            for tok in prompt[:8]:
                eng.decode([tok])
            assert eng.stats().speculation["protected"] > 0
            ahead_of[extra] = [layers.index(t) - layers.index(g) for g, keys in asked for t, _e in keys]
    assert 2 in ahead_of[0.0] and set(ahead_of[0.0]) <= {1, 2}
    assert ahead_of[1.01] and set(ahead_of[1.01]) == {1}


def _spy_prefetches(r: Residency, chances: list[float] | None = None,
                    gated: list[tuple[int, list[tuple[int, int]]]] | None = None) -> list[tuple[int, int]]:
    """The leaves speculation asks ``r`` to prefetch from now on, in order (they are still
    prefetched; the token's own guesses, its first layer's and the memo's, are not counted);
    their chances of use
    (``priority``) go to ``chances``, and each ask with the layer being gated then to ``gated``,
    where given."""
    asked: list[tuple[int, int]] = []
    prefetch = r.prefetch

    def spy(keys: list[tuple[int, int]], *args: object, **kw: object) -> int:
        source = kw.get("source")
        if not isinstance(source, str) or source in (token_guess.SOURCE, token_memo.SOURCE):
            return prefetch(keys, *args, **kw)  # the token's guesses (one call: a source per key)
        asked.extend(keys)
        if gated is not None:
            gated.append((int(kw.get("layer", args[0] if args else 0)), list(keys)))  # type: ignore[call-overload]
        if chances is not None:
            p = kw.get("priority", 1.0)
            chances.extend([float(p)] * len(keys) if isinstance(p, (int, float)) else p)  # type: ignore[arg-type]
        return prefetch(keys, *args, **kw)

    r.prefetch = spy  # type: ignore[method-assign]
    return asked


def test_a_prompt_reads_the_leaves_of_the_next_layer_it_is_guessed_to_select(pack_of) -> None:
    pack = pack_of("qwen3moe", "f32")
    with Engine(pack, budget="50%", n_ctx=256, n_threads=2, profile=None) as eng:
        spec, r = eng.speculator, eng.residency
        assert spec is not None and eng.readahead is None  # speculation reads a prompt's next layer itself
        asked = _spy_prefetches(r)
        tokens = eng.tokenize(PROMPT)
        eng.decode(tokens)
        assert spec.stats.guesses == 0  # no single-token gate yet
        summary = spec.summary()
        assert summary["prefetch"]["queued"] > 0 and summary["prompt"]["recall"] >= 0.5
        layers = sorted(r.costs)
        per_layer = {layer: sum(k[0] == layer for k in asked) for layer in layers}
        assert per_layer[layers[0]] == 0  # nothing guesses the first layer
        assert max(per_layer[layer] for layer in layers[1:-1]) > spec.n_guess  # several tokens' guesses
        assert per_layer[layers[-1]] <= spec.n_guess  # the last layer computes the last token only
        eng.decode([eng.tokenize(" the")[0]])  # one token: speculation guesses and scores
        eng.settle()  # the C path's counts, taken in at the next decode or before figures are read
        assert spec.stats.guesses > 0
        r.state.protect[1, 0] = 1  # as if a guess were left unserved
        eng.decode(eng.tokenize(PROMPT))  # a prompt clears decode's guesses first
        assert not r.state.protect.any()
    with Engine(pack, budget="50%", n_ctx=256, n_threads=2, profile=None, speculate=False) as eng:
        assert eng.speculator is None and eng.readahead is not None  # without it, the whole next layer


def test_a_prompt_micro_batch_too_small_to_read_beside_is_not_guessed(pack_of) -> None:
    pack = pack_of("qwen3moe", "f32")
    with Engine(pack, budget="50%", n_ctx=256, n_threads=2, profile=None, n_ubatch=2) as eng:
        spec, r = eng.speculator, eng.residency
        assert spec is not None and 1 < eng.n_ubatch < spec.min_batch
        asked = _spy_prefetches(r)
        eng.decode(eng.tokenize(PROMPT))
        assert asked == [] and spec.summary()["prompt"] == {"precision": 0.0, "recall": 0.0}
        eng.decode([eng.tokenize(" the")[0]])  # one token: guessed as ever
        assert spec.stats.guesses > 0


def test_a_prompt_cancels_what_is_queued_of_unlikely_guesses() -> None:
    release = threading.Event()

    def fill(layer: int, e: int, _stage: int | None) -> None:
        if (layer, e) == (0, 0):
            assert release.wait(10)

    r = Residency({0: 1, 1: 1}, 4, budget=8, fill=fill)
    assert r.prefetch([(0, 0)], priority=1.0, source="test") == 1  # the I/O thread is busy with it
    assert r.prefetch([(0, 1), (0, 2), (1, 1)], priority=0.05, source="warm-start") == 3
    assert r.prefetch([(1, 2)], priority=0.9, source="test") == 1
    assert r.cancel_below(HOLD_BELOW) == 3
    assert r.used == 2 and r.stats.by_source["warm-start"].cancelled == 3
    release.set()
    r.drain()
    assert _resident(r) == {(0, 0), (1, 2)}
    r.close()


def test_a_cancelled_prefetch_gives_back_the_pages_an_eviction_moved_to_it() -> None:
    """Room for a queued prefetch was made by evicting a leaf whose pages went to it; cancelling
    the prefetch releases them (else they stay resident, uncharged)."""
    busy = threading.Event()
    released: list[tuple[int, int]] = []

    def fill(layer: int, e: int, _stage: int | None) -> None:
        if (layer, e) == (0, 0):
            assert busy.wait(10)

    def recycle(layer: int, e: int, to_layer: int, to_e: int) -> int:
        return 1

    r = Residency({0: 1}, 4, budget=2, fill=fill, release=lambda layer, e: released.append((layer, e)),
                  recycle=recycle)
    _gate(r, 0, 1)
    assert r.prefetch([(0, 0)], priority=1.0) == 1  # the I/O thread is busy with it
    assert r.prefetch([(0, 2)], priority=0.05) == 1  # evicts (0, 1), its pages moved to (0, 2)
    assert r.stats.evictions == 1
    for cancel in (lambda: r.cancel_below(HOLD_BELOW), lambda: r._cancel_or_wait()):
        released.clear()
        cancel()
        assert released == [(0, 2)] and r.used == 1
        assert r.prefetch([(0, 2)], priority=0.05) == 1  # queued again (free room: nothing moved)
    busy.set()
    r.close()


def test_run_json_reports_both_lookaheads(pack_of) -> None:
    pack = pack_of("qwen3moe", "f16")
    code, stdout, stderr = run_cli("run", str(pack), "-p", PROMPT, "-n", "8", "--budget", "25%", "--json",
                                   "--no-profile")
    assert code == 0, stderr
    res = json.loads(stdout)
    spec = res["speculation"]
    assert set(spec["lookaheads"]) == {"1", "2"} and spec["rank"] > 0
    for la in spec["lookaheads"].values():
        assert {"precision", "recall", "per_layer", "by_rank", "by_threshold"} <= set(la)
    assert "prefetch_stall_saved_seconds" in res and "speculation" in res["prefetch_by_source"]


def test_a_pair_the_plain_projection_guesses_badly_gets_a_fit_and_one_it_guesses_well_does_not() -> None:
    rng = np.random.default_rng(0)
    n_expert, n_used = 8, 2
    fit = RouteFit(n_expert, n_used, n_guess=3)
    mix = rng.normal(size=(n_expert, n_expert))  # how the later layer really routes: not the plain guess
    for _ in range(4):
        plain, own = rng.normal(size=(16, n_expert)), rng.normal(size=(16, n_expert))
        f = RouteFit.features(plain, own)
        fit.add((0, 1), f, plain @ mix)
        fit.add((1, 2), f, plain)  # the plain guess is right
    assert fit.fits[(1, 2)] is None and fit.fits[(0, 1)] is not None
    assert fit.summary() == {"fitted": ["0->1"], "plain": ["1->2"]}
    plain = rng.normal(size=(200, n_expert))
    f = RouteFit.features(plain, rng.normal(size=(200, n_expert)))
    actual = plain @ mix
    fitted = fit.predict((0, 1), f)
    assert fitted is not None and fit.predict((1, 2), f) is None
    assert top_recall(fitted, actual, n_used, 3) > 0.95 > 0.7 > top_recall(plain, actual, n_used, 3)


def test_route_fits_learnt_in_one_session_start_the_next_and_stay_bit_exact(tiny_model, pack_of, tmp_path: Path) -> None:
    """The route fits are saved beside the profile and loaded by the next session, which starts
    with the same decisions and the fitted pairs' samples; a damaged file is ignored with a warning."""
    src, pack = tiny_model("qwen3moe", "f32"), pack_of("qwen3moe", "f32")
    prof = tmp_path / "p.json"
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=prof) as eng:
        eng.observer_switch.keep(True)
        eng.generate(PROMPT, N_TOKENS)
        assert eng.speculator is not None
        decided = dict(eng.speculator.fit.fits)
    assert decided, "the session decided no pair"
    routes = route_fit.routes_path(prof)
    assert routes.is_file()
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=prof) as eng:
        assert eng.speculator is not None
        fits = eng.speculator.fit.fits
        assert set(fits) == set(decided)
        for pair, fit in decided.items():
            assert (fits[pair] is None) == (fit is None)
            if fit is not None:
                assert fits[pair].n == fit.n and np.allclose(fits[pair].a, fit.a)
        gen = eng.generate(PROMPT, N_TOKENS, keep_logits=True)
        assert same(reference(src, eng), gen.tokens, gen.logits)
    routes.write_bytes(b"not a zip")
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=prof, learn=False) as eng:
        assert any("route fits" in w and "unreadable" in w for w in eng.warnings)
        assert eng.speculator is not None and not eng.speculator.fit.fits


def test_a_pair_fits_samples_added_one_by_one_as_if_summed_at_once() -> None:
    """Samples are summed into the normal equations in batches; what is read (the sums, the
    count, the solved weights) does not depend on when they were folded in."""
    rng = np.random.default_rng(0)
    n_expert, rows = 4, 2 * route_fit.FOLD_ROWS + 5
    feats, targets = rng.normal(size=(rows, 2 * n_expert + 1)), rng.normal(size=(rows, n_expert))
    one_by_one, at_once = route_fit.PairFit(n_expert), route_fit.PairFit(n_expert)
    for i in range(rows):
        one_by_one.add(feats[i : i + 1], targets[i : i + 1])
    at_once.add(feats, targets)
    assert one_by_one.n == at_once.n == rows
    np.testing.assert_allclose(one_by_one.a, feats.T @ feats, rtol=1e-12)
    np.testing.assert_allclose(one_by_one.b, feats.T @ targets, rtol=1e-12)
    w1, w2 = one_by_one.weights(), at_once.weights()
    assert w1 is not None and w2 is not None
    np.testing.assert_allclose(w1, w2, rtol=1e-9)
