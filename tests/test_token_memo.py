"""A decoded token's later MoE layers guessed from its earlier decodes (token_memo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from smoe_gguf import residency, token_memo
from smoe_gguf.engine import Engine
from smoe_gguf.token_memo import KEEP, SOURCE, SavedMemo, TokenMemo

from .engine_helpers import N_TOKENS, PROMPT, reference, same


def _record(eng: Engine) -> list[tuple[int, np.ndarray]]:
    """Per gate (prompts and decoded tokens alike), its layer and the picks of each row, recorded
    by an observer called at every gate."""
    gates: list[tuple[int, np.ndarray]] = []
    eng.gate.observe(lambda layer, _node, ids: gates.append((layer, np.array(ids))), always=True)
    return gates


def _decoded_picks(gates: list[tuple[int, np.ndarray]], layers: list[int]) -> list[dict[int, set[int]]]:
    """The single-row gates grouped into decoded tokens (a token starts at the first layer)."""
    tokens: list[dict[int, set[int]]] = []
    for layer, ids in gates:
        if ids.shape[0] != 1:
            continue
        if layer == layers[0]:
            tokens.append({})
        if tokens:
            tokens[-1][layer] = {int(e) for e in ids[0]}
    return tokens


@pytest.mark.parametrize(("arch", "ftype"), [("qwen3moe", "f32"), ("deepseek2", "f16")])
def test_each_decoded_token_is_guessed_from_its_earlier_decodes_and_scored_against_its_picks(
        arch, ftype, tiny_model, pack_of) -> None:
    """A token decoded (or prompted) before is guessed, layer by layer, from what those decodes
    picked; every guess is scored against what its layers then picked, rank by rank; a token's
    memo holds its latest picks first; the output stays bit-exact."""
    src, pack = tiny_model(arch, ftype), pack_of(arch, ftype)
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None) as eng:
        memo = eng.token_memo
        assert memo is not None
        layers = [int(x) for x in memo.layers]
        gates = _record(eng)
        seen: list[tuple[int, np.ndarray | None]] = []
        guess = memo.guess

        def spy(token: int) -> tuple[list[tuple[int, int]], list[float]]:
            seen.append((token, memo._orders(token)))
            return guess(token)

        memo.guess = spy  # type: ignore[method-assign]
        gen = eng.generate(PROMPT, N_TOKENS, keep_logits=True)
        assert same(reference(src, eng), gen.tokens, gen.logits)
        picks = _decoded_picks(gates, layers)
        assert len(picks) == len(seen) == len(gen.tokens) - 1
        hits = np.zeros_like(memo.hits)
        scored = np.zeros_like(memo.scored)
        for (_token, orders), picked in zip(seen, picks, strict=True):
            if orders is None:
                continue
            for i, layer in enumerate(layers):
                for r, e in enumerate(orders[i].tolist()):
                    if e >= 0:
                        scored[i, r] += 1
                        hits[i, r] += e in picked[layer]
        assert memo.guessed == sum(o is not None for _, o in seen) > 0  # prompt tokens were kept
        assert np.array_equal(memo.hits, hits) and np.array_equal(memo.scored, scored)
        last_token, last = seen[-1][0], picks[-1]
        kept = memo._memo[last_token][0]
        assert all(set(kept[i].tolist()) == last[layer] for i, layer in enumerate(layers))
        summary = eng.stats().speculation["memo"]
        assert summary["tokens"] == len(seen) and summary["guessed"] == memo.guessed


def test_a_prompt_keeps_each_token_s_picks_except_where_its_layer_computed_fewer_rows(pack_of) -> None:
    """Every prompt token's picks are kept per layer, read from the gates' rows; the last layer,
    which computes the output row only, keeps nothing for the prompt."""
    with Engine(pack_of("qwen3moe", "f32"), budget="25%", n_ctx=256, n_threads=2, profile=None) as eng:
        memo = eng.token_memo
        assert memo is not None
        gates = _record(eng)
        tokens = eng.tokenize(PROMPT)
        eng.decode(tokens)
        layers = [int(x) for x in memo.layers]
        rows = {layer: np.concatenate([ids for g, ids in gates if g == layer]) for layer in layers}
        latest: dict[int, int] = {}
        for pos, tok in enumerate(tokens):
            latest[tok] = pos
        for tok, pos in latest.items():
            kept = memo._memo[tok][0]
            for i, layer in enumerate(layers):
                if rows[layer].shape[0] == len(tokens):
                    assert sorted(kept[i].tolist()) == sorted(rows[layer][pos].tolist())
                else:
                    assert (kept[i] == -1).all()
        assert rows[layers[-1]].shape[0] < len(tokens)


def test_guesses_that_pay_are_protected_and_the_unresident_ones_prefetched(pack_of, monkeypatch) -> None:
    """With a bar of 0 every guess of a later layer is protected before the first gate, and those
    not resident are queued; with a bar no chance can reach, nothing is."""
    for bar in (0.0, 1.01):
        monkeypatch.setattr(residency, "AHEAD_COST", 0.0)
        with Engine(pack_of("qwen3moe", "f32"), budget="25%", n_ctx=256, n_threads=2, profile=None) as eng:
            memo, r = eng.token_memo, eng.residency
            assert memo is not None and eng.spec_native is not None
            tokens = eng.tokenize(PROMPT)
            eng.decode(tokens)
            eng.decode(tokens[-1:])  # the C path now guesses decoded tokens
            tok = tokens[1]
            orders = memo._orders(tok)
            assert orders is not None
            src = r.stats.by_source.get(SOURCE)
            queued0 = src.queued if src is not None else 0
            monkeypatch.setattr(r, "prefetch_bar", lambda batch=False, bar=bar: bar)
            keys, prios = memo.guess(tok)  # queued as the engine does (with the first layer's)
            queued = r.prefetch(keys, layer=int(memo.layers[0]), in_use=[], priority=prios,
                                source=SOURCE) if keys else 0
            later = [(int(layer), e) for i, layer in enumerate(memo.layers) if i > 0
                     for e in orders[i].tolist() if e >= 0]
            protected = {(int(a), int(b)) for a, b in zip(*np.nonzero(r.state.protect))}
            if bar:
                assert queued == 0 and not protected
            else:
                assert protected == set(later)
                assert queued > 0 and r.stats.by_source[SOURCE].queued == queued0 + queued
            eng.decode([tok])
            eng.settle()
            assert r.used <= r.budget


def test_the_memo_learnt_in_one_session_starts_the_next(tiny_model, pack_of, tmp_path: Path) -> None:
    """The memo is saved beside the profile and loaded by the next session, which guesses its
    first decoded token from it and stays bit-exact; one of another model is ignored with a
    warning, and so is a damaged one."""
    src, pack = tiny_model("qwen3moe", "f32"), pack_of("qwen3moe", "f32")
    prof = tmp_path / "p.json"
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=prof) as eng:
        eng.generate(PROMPT, N_TOKENS)
        assert eng.token_memo is not None
        kept = {t: v.copy() for t, v in eng.token_memo._memo.items()}
        scored = eng.token_memo.scored.copy()
    path = token_memo.memo_path(prof)
    assert path.is_file()
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=prof) as eng:
        memo = eng.token_memo
        assert memo is not None
        assert set(memo._memo) == set(kept) and all(np.array_equal(memo._memo[t], v) for t, v in kept.items())
        assert np.array_equal(memo.scored, scored)
        gen = eng.generate(PROMPT, N_TOKENS, keep_logits=True)
        assert same(reference(src, eng), gen.tokens, gen.logits)
        assert memo.guessed == len(gen.tokens) - 1  # every decoded token was met before
    saved = token_memo.load_memo(path, eng.source.model_id, eng.source.n_expert, pytest.fail)
    assert saved is not None and saved.scored.sum() > scored.sum()  # the second session's counts added
    warnings: list[str] = []
    assert token_memo.load_memo(path, "another model", eng.source.n_expert, warnings.append) is None
    assert "another model" in warnings[-1]
    path.write_bytes(b"not a zip")
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=prof, learn=False) as eng:
        assert any("token memo" in w and "unreadable" in w for w in eng.warnings)
        assert eng.token_memo is not None and not eng.token_memo._memo


def test_the_memo_keeps_the_latest_decodes_of_the_most_recent_tokens(monkeypatch) -> None:
    """A token keeps its last KEEP decodes, latest first, a layer not gated keeping what it had;
    beyond MAX_TOKENS the token decoded longest ago goes; ranks follow the counts, the latest
    decode breaking ties."""
    monkeypatch.setattr(token_memo, "MAX_TOKENS", 2)
    r = residency.Residency({0: 1, 1: 1}, 4, 4, "lru")
    memo = TokenMemo(r, 2)
    rows = [np.array([[0, 1], [2, 3]]), np.array([[0, 2], [-1, -1]]), np.array([[0, 2], [1, 3]])]
    for row in rows:
        memo._keep_row(7, row)
    kept = memo._memo[7]
    assert kept.shape == (KEEP, 2, 2)
    assert kept[0].tolist() == [[0, 2], [1, 3]] and kept[1].tolist() == [[0, 2], [2, 3]]
    order = memo._orders(7)
    assert order is not None
    assert order[0].tolist()[:2] == [0, 2] and order[0].tolist()[2] == 1 and order[0, 3] == -1
    assert order[1].tolist()[:3] == [3, 2, 1]  # 3 twice; then 2 (twice) before 1 (once, latest)
    memo._keep_row(8, rows[0])
    memo._keep_row(7, rows[0])  # 7 is now the latest decoded
    memo._keep_row(9, rows[0])
    assert set(memo._memo) == {7, 9}
    learnt = memo.learnt()
    assert isinstance(learnt, SavedMemo) and set(learnt.tokens.tolist()) == {7, 9}


def test_a_decoded_tokens_guesses_are_queued_before_the_last_tokens_books(pack_of, monkeypatch) -> None:
    """Between two decoded tokens the next token's guesses (first layer, then the memo) come
    before the last token's are scored and before the C path's counts are taken in, so their
    reads start sooner; every decoded token is still scored once, by the end of generate."""
    pack = pack_of("qwen3moe", "f32")
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None) as eng:
        guess, memo, nat = eng.token_guess, eng.token_memo, eng.spec_native
        assert guess is not None and memo is not None and nat is not None
        monkeypatch.setattr(eng.residency, "prefetch_bar", lambda batch=False: 0.0)  # every guess pays
        events: list[str] = []
        for name, obj, meth in (("guess", guess, "guess"), ("memo", memo, "guess"),
                                ("scored", memo, "score"), ("counts", nat, "take_counts"),
                                ("prefetch", eng.residency, "prefetch")):
            orig = getattr(obj, meth)
            monkeypatch.setattr(obj, meth, lambda *a, _o=orig, _n=name, **k: (events.append(_n), _o(*a, **k))[1])
        gen = eng.generate(PROMPT, N_TOKENS)
        decoded = len(gen.tokens) - 1
        assert events.count("guess") == events.count("memo") == decoded
        assert memo.tokens == decoded  # each scored, the last one when generate ended
        # the first decoded token is guessed once the C path starts; from the second on, each
        # token's guesses come first, queued in one call where any pays, then the last token's
        # books; generate's end takes the last's
        tail = [e for e in events[events.index("guess"):] if e != "prefetch"]
        assert tail == ["guess", "memo"] + ["guess", "memo", "scored", "counts"] * (decoded - 1) + ["scored", "counts"]
        # the first layer's guess and the memo's are queued together: at most one prefetch call
        # a token, right after both guesses
        between = [events[i + 1 : i + 3] for i, e in enumerate(events) if e == "guess"]
        assert all(b[0] == "memo" for b in between)
        assert any(b[1:] == ["prefetch"] for b in between)
        runs = "".join("p" if e == "prefetch" else "." for e in events[events.index("guess"):])
        assert "pp" not in runs


def _orders_reference(kept: np.ndarray, n_expert: int, max_rank: int) -> np.ndarray:
    """The memo's ranking in numpy: 2 per kept decode and 1 more for the latest, ties to the
    lower expert, -1 past the experts picked."""
    score = np.zeros((kept.shape[1], n_expert), np.int64)
    for k, rows in enumerate(kept):
        for layer, row in enumerate(rows):
            for e in row[row >= 0]:
                score[layer, e] += 3 if k == 0 else 2
    order = np.argsort(-score, axis=1, kind="stable")[:, :max_rank]
    return np.where(np.take_along_axis(score, order, axis=1) > 0, order, -1)


def test_the_memo_s_steps_in_c_rank_choose_score_and_keep_as_numpy_does() -> None:
    """Random kept decodes and picks: the C ranking, the guesses chosen (protected, listed), the
    scoring and the kept rows are the numpy reference's."""
    rng = np.random.default_rng(0)
    n_layer, n_expert, n_used = 5, 16, 3
    r = residency.Residency({layer: 1 for layer in range(n_layer)}, n_expert, 4, "lru")
    class Pass:  # the C speculation's new pass, which lets the memo protect its guesses
        def new_pass(self) -> bool:
            return True

    memo = TokenMemo(r, n_used, Pass())  # type: ignore[arg-type]
    R = memo.max_rank
    s = r.state
    listed = 0
    for _step in range(200):
        token = int(rng.integers(0, 6))
        kept = memo._memo.get(token)
        order = memo._orders(token)
        if kept is None:
            assert order is None
        else:
            assert np.array_equal(order, _orders_reference(kept, n_expert, R))
        s.resident[:] = rng.integers(0, 2, s.resident.shape)
        s.protect[:] = 0
        memo.hits[:] = rng.integers(0, 50, memo.hits.shape)
        memo.scored[:] = memo.hits + rng.integers(0, 50, memo.hits.shape)
        p = memo.p_used()
        keys, prios = memo.guess(token)
        if order is not None:
            bar, ahead = r.prefetch_bar(), r.ahead_cost()
            want_keys, want_p, want_protect = [], [], set()
            for li in range(1, n_layer):
                for rank in range(R):
                    e = int(order[li, rank])
                    if e < 0 or p[li, rank] < bar:
                        continue
                    want_protect.add((li, e))
                    if not s.resident[li, e] and p[li, rank] >= (bar if li == 1 else bar + ahead):
                        want_keys.append((li, e))
                        want_p.append(float(p[li, rank]))
            assert keys == want_keys and prios == want_p
            assert {(int(a), int(b)) for a, b in zip(*np.nonzero(s.protect), strict=True)} == want_protect
            listed += len(keys)
        pending = memo.take_pending()
        assert pending is not None
        gated = rng.random(n_layer) < 0.8
        picks = {}
        for layer in np.flatnonzero(gated).tolist():
            picks[layer] = np.sort(rng.choice(n_expert, n_used, replace=False))
            s.uses[layer, picks[layer]] += 1
        hits0, scored0, tokens0 = memo.hits.copy(), memo.scored.copy(), memo.tokens
        before = None if kept is None else kept.copy()
        memo.score(pending)
        if not picks:
            assert memo.tokens == tokens0 and np.array_equal(memo.hits, hits0)
            continue
        assert memo.tokens == tokens0 + 1
        if order is not None:
            for layer in range(n_layer):
                for rank in range(R):
                    e = int(order[layer, rank])
                    counted = e >= 0 and layer in picks
                    assert memo.scored[layer, rank] == scored0[layer, rank] + counted
                    assert memo.hits[layer, rank] == hits0[layer, rank] + (counted and e in picks[layer])
        now = memo._memo[token]
        for layer in range(n_layer):
            if layer in picks:
                assert now[0, layer].tolist() == picks[layer].tolist()
            else:
                assert now[0, layer].tolist() == ([-1] * n_used if before is None else before[0, layer].tolist())
        if before is not None:
            assert np.array_equal(now[1:], before[:-1])
    assert memo.guessed > 50 and listed > 50
