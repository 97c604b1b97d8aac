"""The first MoE layer guessed from the token about to be decoded (token_guess)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from smoe_gguf import residency
from smoe_gguf.engine import Engine
from smoe_gguf.token_guess import SOURCE

from .engine_helpers import N_TOKENS, PROMPT, reference, same


def _record_first_layer(eng: Engine) -> list[list[int]]:
    """The experts the first paged layer picks at each single-token gate, recorded by an
    observer called at every gate."""
    first = min(eng.residency.costs)
    picks: list[list[int]] = []

    def observe(layer: int, _node: int, ids: np.ndarray) -> None:
        if layer == first and ids.shape[0] == 1:
            picks.append(sorted(int(e) for e in ids[0]))

    eng.gate.observe(observe, always=True)
    return picks


@pytest.mark.parametrize(("arch", "ftype"), [("qwen3moe", "f32"), ("deepseek2", "f16"), ("gpt-oss", "f16")])
def test_each_decoded_token_guesses_its_first_layer_and_is_scored_against_its_picks(arch, ftype, tiny_model, pack_of) -> None:
    """Every decoded token's guess is scored, rank by rank, against what the first MoE layer then
    picked (read from the leaves its gate stamped, whatever was prefetched); the output stays
    bit-exact."""
    src, pack = tiny_model(arch, ftype), pack_of(arch, ftype)
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None) as eng:
        guess = eng.token_guess
        assert guess is not None
        picks = _record_first_layer(eng)
        orders: list[np.ndarray] = []
        make_guess = guess.guess

        def spy(token: int) -> tuple[list[tuple[int, int]], list[float]]:
            if not orders:
                picks.clear()  # the prompt's (a last layer computes its last row only)
            out = make_guess(token)
            order = guess._order(token)
            assert order is not None  # the embedding was found while the prompt was observed
            orders.append(order.copy())
            return out

        guess.guess = spy  # type: ignore[method-assign]
        gen = eng.generate(PROMPT, N_TOKENS, keep_logits=True)
        assert same(reference(src, eng), gen.tokens, gen.logits)
        decoded = len(gen.tokens) - 1  # the last token sampled is not decoded
        assert len(orders) == decoded and len(picks) == decoded
        hits = np.zeros(guess.max_rank, np.int64)
        for order, picked in zip(orders, picks, strict=True):
            hits += np.isin(order, picked)
        assert np.array_equal(guess.hits, hits) and guess.scored == decoded
        summary = eng.stats().speculation["first_layer"]
        k = eng.source.n_expert_used
        assert summary["tokens"] == decoded
        assert summary["recall"] == round(int(hits[:k].sum()) / (decoded * k), 4)


@pytest.mark.parametrize("ftype", ["f32", "q4_k_m"])
def test_the_guess_ranks_the_embedding_as_the_first_router_would(ftype, tiny_model, pack_of) -> None:
    """The ranking is the first layer's router over ``rms_norm(embedding row) * norm weight``,
    computed here from the GGUF itself (its embedding dequantized where it is quantized)."""
    src, pack = tiny_model("qwen3moe", ftype), pack_of("qwen3moe", ftype)
    t = {x.name: x for x in gguf.GGUFReader(src).tensors}

    def values(name: str) -> np.ndarray:
        x = t[name]
        return np.asarray(dequantize(x.data, x.tensor_type), np.float32)

    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None) as eng:
        guess = eng.token_guess
        assert guess is not None
        tokens = eng.tokenize(PROMPT)
        eng.decode(tokens)
        eng.decode(tokens[:1])  # the speculator has found the embedding and its routers by now
        first, k = guess.layer, eng.source.n_expert_used
        emb, w = values("token_embd.weight"), values(f"blk.{first}.ffn_norm.weight")
        router = values(f"blk.{first}.ffn_gate_inp.weight")
        for tok in tokens:
            x = emb[tok] / np.sqrt(np.mean(emb[tok] ** 2) + 1e-6) * w
            got = guess._order(tok)
            assert got is not None
            assert np.array_equal(got[:k], np.argsort(-(router @ x), kind="stable")[:k])


@pytest.mark.parametrize("read_cost", [0.0, 1.01])
def test_a_first_layer_guess_is_prefetched_only_where_it_pays(read_cost, pack_of, monkeypatch) -> None:
    """The cost model's bar applies: with reads free, guesses are prefetched and gates use them;
    with a bar no chance can reach, none is, yet every token is still scored."""
    monkeypatch.setattr(residency, "READ_COST", read_cost)
    pack = pack_of("qwen3moe", "f32")
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None) as eng:
        guess = eng.token_guess
        assert guess is not None
        gen = eng.generate(PROMPT, N_TOKENS)
        counts = eng.stats().prefetch_by_source.get(SOURCE)
        assert guess.scored == len(gen.tokens) - 1
        assert 0 < guess.hits.sum() <= eng.source.n_expert_used * guess.scored  # at most k picks a token
        if read_cost:
            assert counts is None
        else:
            assert counts is not None and counts["queued"] > 0
            assert counts["used"] + counts["claimed"] > 0


def test_no_guess_without_speculation(pack_of) -> None:
    with Engine(pack_of("qwen3moe", "f32"), budget="25%", n_ctx=256, n_threads=2, profile=None, speculate=False) as eng:
        assert eng.token_guess is None
        eng.generate(PROMPT, 4)
        assert SOURCE not in eng.stats().prefetch_by_source
