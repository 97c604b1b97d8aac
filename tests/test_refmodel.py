"""The reference-model toolkit (smoe_gguf/devtools/refmodel.py) against llama.cpp, on tiny models.

Fast and torch-free except where marked: the tokenizer and the numpy forward are checked
against stock llama.cpp, the routing statistics on crafted routes, the corpus on a small budget,
and the exported model through smoe-gguf's own pipeline (split + Engine against stock).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from smoe_gguf.devtools import refmodel as rm
from smoe_gguf.devtools import stock
from smoe_gguf.errors import SmoeError

TRAIN_TEXTS = [
    "def add(a, b):\n    \"\"\"Return the sum.\"\"\"\n    return a + b\n\n\nclass Point:\n    x: int = 0\n",
    "import os\nfor i in range(10):\n    print(i, os.getcwd())  # loop\n",
    "#include <stdio.h>\n#define MAX_LEN 4096\nstatic int count_lines(const char *s) {\n\treturn 0;\n}\n",
    "struct list_head {\n\tstruct list_head *next, *prev;\n};\ntypedef unsigned long size_t;\n",
    "NAME\n       ls - list directory contents\nSYNOPSIS\n       ls [OPTION]... [FILE]...\n",
    "The quick brown fox jumps over the lazy dog. It's what we'll do; they're sure I'd go.\n",
    "This package is free software; you can redistribute it under the terms of the GNU GPL.\n",
    "Numbers 0 1 2 3 42 1000 3.14159 and 2024-11-23, naïve café, Ünïcödé, 東京, Ⅳ ½ ² 😀.\n",
] * 4

TOKENIZER_CASES = [
    "def foo(x):\n    return x + 1\n",
    "int main(void) {\n\treturn printf(\"%d\\n\", 42);\n}\n",
    "The quick brown fox jumps over the lazy dog. It's here; we'll see, they'RE OK.",
    "naïve café, 東京 ½ ² Ⅳ ٣ 😀 emoji — dash «quotes»",
    "Numbers: 0 12 345 6789 3.14159 1e-5 0x1F 2024-11-23",
    "  leading   runs   of spaces  \t\t tabs\n\n\n   newlines \r\n crlf\n    ",
    "    \n",
    "   ",
    "a\u00a0b\u2003c\u3000d",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "",
]


@pytest.fixture(scope="module")
def tok() -> rm.Tokenizer:
    return rm.train_tokenizer(TRAIN_TEXTS, 420)


@pytest.fixture(scope="module")
def cfg(tok: rm.Tokenizer) -> rm.ModelConfig:
    return rm.ModelConfig(n_vocab=tok.n_vocab, n_layer=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=16,
                          n_expert=16, n_used=2, n_ff_exp=96, n_ctx_train=256)


@pytest.fixture(scope="module")
def weights(cfg: rm.ModelConfig) -> rm.Weights:
    # a larger std than training's init: distinct logits and router scores (no near-ties)
    return rm.init_weights(cfg, seed=3, std=0.25)


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory: pytest.TempPathFactory, cfg: rm.ModelConfig, weights: rm.Weights,
              tok: rm.Tokenizer) -> Path:
    return rm.write_gguf(tmp_path_factory.mktemp("ref") / "tiny-f32.gguf", cfg, weights, tok, dtype="f32")


@pytest.fixture(scope="module")
def f16_model(tmp_path_factory: pytest.TempPathFactory, cfg: rm.ModelConfig, weights: rm.Weights,
              tok: rm.Tokenizer) -> Path:
    return rm.write_gguf(tmp_path_factory.mktemp("ref") / "tiny-f16.gguf", cfg, weights, tok, dtype="f16")


def _ids(tok: rm.Tokenizer, n: int) -> list[int]:
    text = "".join(TRAIN_TEXTS[:8]) + " ".join(TOKENIZER_CASES)
    ids = tok.encode(text, parse_special=False)
    assert len(ids) >= n
    return ids[:n]


# ------------------------------------------------------------------------------ (a) tokenizer


def test_pretokenize_follows_the_qwen2_split() -> None:
    assert rm.pretokenize("a   b") == ["a", "  ", " b"]  # \s+(?!\S) leaves the last space to the word
    assert rm.pretokenize("x  ") == ["x", "  "]  # a run at the end stays whole
    assert rm.pretokenize("it's 123") == ["it", "'s", " ", "1", "2", "3"]  # digits one by one
    assert rm.pretokenize("a\n\n  b") == ["a", "\n\n", " ", " b"]
    assert rm.pretokenize("(x)\n") == ["(x", ")\n"]  # one non-letter may lead a word


@pytest.mark.parametrize("text", TOKENIZER_CASES)
def test_llama_cpp_tokenizes_exactly_as_the_trainer(text: str, tok: rm.Tokenizer, f32_model: Path) -> None:
    assert stock.tokenize(f32_model, text) == tok.encode(text)


def test_llama_cpp_tokenizes_real_source_as_the_trainer(tok: rm.Tokenizer, f32_model: Path) -> None:
    text = Path(rm.__file__).read_text()[:6000] + Path(__file__).read_text()[:3000]
    assert stock.tokenize(f32_model, text) == tok.encode(text)


def test_tokenizer_round_trips(tok: rm.Tokenizer, f32_model: Path) -> None:
    for text in TOKENIZER_CASES:
        assert tok.decode(tok.encode(text)) == text
    back = rm.Tokenizer.from_gguf(f32_model)
    assert back.tokens == tok.tokens and back.merges == tok.merges and back.specials == tok.specials
    assert tok.n_vocab == 420 and tok.tokens[-3:] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# ------------------------------------------------------------------------------ (b) forward


def test_llama_cpp_logits_and_routing_match_numpy_forward(f32_model: Path, cfg: rm.ModelConfig,
                                                          weights: rm.Weights, tok: rm.Tokenizer) -> None:
    ids = _ids(tok, 96)
    ref, routes = rm.numpy_forward(weights, cfg, ids)
    with rm.LlamaRunner(f32_model, n_ctx=128, probe_experts=cfg.n_expert) as r:
        got = r.logits(ids)
        assert r.probe is not None
        probs = r.probe.take()
    m = rm.logits_match(ref, got)
    assert m["ref_logit_std"] > 0.3, "the test model's logits should not be flat"
    assert m["max_abs_diff"] < 1e-3 * max(1.0, float(np.abs(ref).max())), m
    assert m["argmax_agreement"] == 1.0
    assert len(probs) == cfg.n_layer
    for il, (pr, sel) in enumerate(zip(probs, routes, strict=True)):
        assert pr.shape == (len(ids), cfg.n_expert)
        np.testing.assert_allclose(pr.sum(-1), 1.0, atol=1e-5)
        llama_sel = np.sort(np.argsort(-pr, axis=-1, kind="stable")[:, :cfg.n_used], axis=-1)
        assert np.array_equal(llama_sel, np.sort(sel, axis=-1)), f"layer {il}: llama.cpp routes differently"
    # llama.cpp's view of the routing differs from token to token (the experts are used)
    assert len({tuple(row) for row in np.sort(routes[0], axis=-1)}) > 4


def test_compare_with_llama_and_read_back(f32_model: Path, cfg: rm.ModelConfig, weights: rm.Weights,
                                          tok: rm.Tokenizer) -> None:
    ids = _ids(tok, 64)
    figures = rm.compare_with_llama(f32_model, cfg.n_expert, cfg.n_used, lambda x: rm.numpy_forward(weights, cfg, x),
                                    {"python": ids[:40], "man": ids[20:64]})
    assert figures["route_agreement"] == 1.0 and figures["argmax_agreement"] == 1.0
    assert figures["n_positions"] == 84 and set(figures["domains"]) == {"python", "man"}
    d = figures["domains"]["man"]
    assert abs(d["loss_reference"] - d["loss_llama"]) < 1e-3
    cfg2, w2 = rm.read_gguf_weights(f32_model)
    assert cfg2 == cfg
    assert all(np.array_equal(w2[n], weights[n]) for n in weights)


def test_f16_export_holds_rounded_matrices(f16_model: Path, weights: rm.Weights) -> None:
    _, w16 = rm.read_gguf_weights(f16_model)
    expect = rm.f16_rounded(weights)
    assert all(np.array_equal(w16[n], expect[n]) for n in weights)
    assert np.array_equal(w16["blk.0.ffn_gate_inp.weight"], weights["blk.0.ffn_gate_inp.weight"])  # router F32


def test_write_gguf_refuses_a_wrong_shape(tmp_path: Path, cfg: rm.ModelConfig, weights: rm.Weights,
                                          tok: rm.Tokenizer) -> None:
    bad = dict(weights)
    bad["blk.0.attn_q.weight"] = bad["blk.0.attn_q.weight"][:, :-1]
    with pytest.raises(SmoeError, match="attn_q"):
        rm.write_gguf(tmp_path / "bad.gguf", cfg, bad, tok)
    assert list(tmp_path.iterdir()) == []  # nothing left behind


# ------------------------------------------------------------------------------ (c) torch


def test_torch_forward_matches_numpy_forward(cfg: rm.ModelConfig, weights: rm.Weights, tok: rm.Tokenizer) -> None:
    pytest.importorskip("torch")
    ids = _ids(tok, 80)
    ref, routes = rm.numpy_forward(weights, cfg, ids)
    got, troutes = rm.torch_logits(weights, cfg, ids)
    np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())), rtol=0)
    for a, b in zip(routes, troutes, strict=True):
        assert np.array_equal(np.sort(a, axis=-1), np.sort(b, axis=-1))


def test_train_runs_and_learns(tok: rm.Tokenizer) -> None:
    pytest.importorskip("torch")
    cfg = rm.ModelConfig(n_vocab=tok.n_vocab, n_layer=1, n_embd=32, n_head=2, n_head_kv=1, head_dim=16,
                         n_expert=8, n_used=2, n_ff_exp=32, n_ctx_train=32)
    docs = [rm.Document(dom, f"/{dom}/{i}", text, (i // 4) % 4 == 0)
            for i, (dom, text) in enumerate(zip(rm.DOMAINS * 8, TRAIN_TEXTS))]
    streams = rm.tokenize_corpus(docs, tok)
    tc = rm.TrainConfig(steps=12, batch=4, seq_len=32, lr=1e-2, warmup=2, eval_every=4, eval_windows=2)
    seen: list[int] = []
    res = rm.train(cfg, tc, streams, on_step=lambda s, p: seen.append(s))
    assert res.steps_done == 12 and res.stopped_by == "steps" and seen == list(range(1, 13))
    assert [p["step"] for p in res.curve] == [4, 8, 12]
    first, last = res.curve[0], res.curve[-1]
    assert last["heldout_loss"] < first["heldout_loss"] and last["train_loss"] < math.log(tok.n_vocab)
    assert set(last["train_by_domain"]) == set(rm.DOMAINS)
    assert set(res.weights) == set(rm.tensor_shapes(cfg))
    timed = rm.train(cfg, rm.TrainConfig(steps=10_000, batch=4, seq_len=32, eval_every=1000, eval_windows=1,
                                         max_seconds=1.0), streams)
    assert timed.stopped_by == "time" and timed.curve[-1]["step"] == timed.steps_done


# ------------------------------------------------------------------------------ (d) routing statistics


def test_entropy_bits() -> None:
    assert rm.entropy_bits(np.array([5, 5, 5, 5])) == pytest.approx(2.0)
    assert rm.entropy_bits(np.array([0, 7, 0])) == 0.0
    assert rm.entropy_bits(np.array([0, 0])) == 0.0
    assert rm.entropy_bits([1, 1, 2]) == pytest.approx(1.5)


def test_lru_hits() -> None:
    sel = np.array([[0, 1], [0, 1], [2, 3], [0, 1]])
    # [0,1]: 2 misses; [0,1]: 2 hits; [2,3]: 2 misses, evicts 0 and 1; [0,1]: 2 misses
    assert rm.lru_hits(sel, 2) == (2, 8)
    assert rm.lru_hits(sel, 4) == (4, 8)  # room for all: only the first touch of each misses
    assert rm.lru_hits(np.array([[0, 1], [1, 2], [0, 2]]), 2) == (2, 6)  # 1 then 2 hit; 0 was evicted
    with pytest.raises(SmoeError):
        rm.lru_hits(sel, 1)


def test_summarise_routes_on_crafted_routes() -> None:
    t = 100
    code = [np.tile([0, 1], (t, 1)), np.tile([0, 1], (t, 1))]
    prose = [np.tile([2, 3], (t, 1)), np.array([[0, 1], [2, 3]] * (t // 2))]
    s = rm.summarise_routes({"python": code, "man": prose}, n_expert=4, lru_fractions=(0.5,))
    assert s["lru_capacities"] == [2] and s["n_layer"] == 2 and s["n_used"] == 2
    assert s["domains"]["python"]["usage_entropy_bits"] == [1.0, 1.0]
    assert s["domains"]["man"]["usage_entropy_bits"] == [1.0, 2.0]
    h_all1 = rm.entropy_bits([3, 3, 1, 1])  # layer 1: python on {0,1}, man on all four
    assert s["all_usage_entropy_bits"] == [2.0, pytest.approx(h_all1, abs=1e-4)]
    # layer 0: the domain decides the experts (1 bit); layer 1: I = H(expert) - H(expert | domain)
    mi1 = h_all1 - (1.0 + 2.0) / 2
    assert s["domain_expert_mutual_information_bits"] == [1.0, pytest.approx(mi1, abs=1e-4)]
    code_rates = s["groups"]["code"]["lru_hit_rate"]["2"]
    assert code_rates == [pytest.approx((2 * t - 2) / (2 * t), abs=1e-4)] * 2
    assert s["groups"]["prose"]["lru_hit_rate"]["2"][1] == 0.0  # alternating pairs never hit an LRU of 2
    assert s["groups"]["prose"]["lru_hit_rate_shuffled_mean"]["2"] > 0.0  # shuffled, repeats appear
    assert s["domains"]["python"]["usage"][0] == [t, t, 0, 0]
    assert s["uniform_lru_hit_rate"] == {"2": 0.5}
    table = rm.format_route_table(s)
    assert "code@2" in table and "prose@2" in table and "mean" in table


def test_lru_capacities() -> None:
    assert rm.lru_capacities(64, 4) == [8, 16, 32]
    assert rm.lru_capacities(16, 4, (0.125, 0.25, 1.0)) == [4, 16]


def test_route_stats_through_llama_cpp(f32_model: Path, cfg: rm.ModelConfig, tok: rm.Tokenizer,
                                       weights: rm.Weights) -> None:
    texts = {"python": [TRAIN_TEXTS[0], TRAIN_TEXTS[1]], "c": [TRAIN_TEXTS[2]], "man": [TRAIN_TEXTS[4]],
             "doc": [TRAIN_TEXTS[6]]}
    s = rm.route_stats(f32_model, texts, max_tokens=60, chunk=32)
    assert set(s["domains"]) == set(texts) and set(s["groups"]) == {"code", "prose"}
    ids = rm.domain_token_ids(tok, texts["python"], 60)
    assert s["domains"]["python"]["tokens"] == len(ids)
    for d in s["domains"].values():
        assert all(0.0 <= h <= math.log2(cfg.n_expert) + 1e-9 for h in d["usage_entropy_bits"])
        assert all(sum(u) == d["tokens"] * cfg.n_used for u in d["usage"])
    # the same selections as numpy's forward, chunk by chunk (contexts of 32 tokens)
    want = np.concatenate([rm.numpy_forward(weights, cfg, ids[a:a + 32])[1][0] for a in range(0, len(ids), 32)])
    assert s["domains"]["python"]["usage"][0] == np.bincount(want.ravel(), minlength=cfg.n_expert).tolist()


# ------------------------------------------------------------------------------ (e) corpus


def test_corpus_is_deterministic_and_labelled() -> None:
    spec = rm.CorpusSpec(bytes_per_domain=30_000, max_doc_bytes=4_000)
    a, b = rm.collect_corpus(spec), rm.collect_corpus(spec)
    assert a == b and rm.corpus_digest(a) == rm.corpus_digest(b)
    assert {d.domain for d in a} <= set(rm.DOMAINS) and "python" in {d.domain for d in a}
    roots = spec.roots()
    for d in a:
        path = Path(d.source)
        assert path.is_relative_to(roots[d.domain])
        assert {"python": ".py", "c": ".h", "man": ".gz"}.get(d.domain, path.suffix) == path.suffix
        assert len(d.text.encode()) <= spec.max_doc_bytes and d.text.strip()
    for dom, s in rm.corpus_summary(a).items():
        total = s["train_bytes"] + s["heldout_bytes"]
        assert total < spec.bytes_per_domain + spec.max_doc_bytes
        assert total >= spec.bytes_per_domain or dom != "python"  # the stdlib has plenty
    assert rm.corpus_digest(a[:-1]) != rm.corpus_digest(a)


def test_strip_troff() -> None:
    src = ('.\\" a comment\n.TH LS 1 "2024" "GNU"\n.SH NAME\nls \\- list directory contents\n'
           ".SH SYNOPSIS\n.B ls\n[\\fIOPTION\\fR]... [\\fIFILE\\fR]...\n.BR ls (1)\n.PP\n.sp 2\n")
    assert rm.strip_troff(src) == ("LS 1 2024 GNU\nNAME\nls - list directory contents\nSYNOPSIS\nls\n"
                                   "[OPTION]... [FILE]...\nls(1)\n")


# ------------------------------------------------------------------------------ smoe-gguf pipeline


def test_exported_model_runs_bit_exact_in_the_engine(tmp_path: Path, f16_model: Path) -> None:
    from smoe_gguf.engine import Engine
    from smoe_gguf.pack.split import split

    pack = tmp_path / "ref.pack"
    split(f16_model, pack)
    prompt = "def add(a, b):\n    return"
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None) as eng:
        gen = eng.generate(prompt, 16)
        ref = stock.greedy(f16_model, prompt, 16, plain_experts=True, n_batch=eng.n_batch, n_ubatch=eng.n_ubatch)
        assert gen.tokens == ref.tokens
        assert eng.residency is not None and eng.residency.stats.evictions > 0
