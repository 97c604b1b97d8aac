"""Widening experts with zero neurons (smoe_gguf/devtools/widen.py): llama.cpp gives the same tokens
and logits, and the pack's leaves grow by the factor."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from smoe_gguf.devtools import refmodel as rm
from smoe_gguf.devtools.widen import WIDEN_KEY, compare_models, widen_experts
from smoe_gguf.errors import SmoeError
from smoe_gguf.gguf_layout import read_layout
from smoe_gguf.pack.split import split

PROMPTS = [
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n    y: int = 0\n\n    def norm(self):",
    "#include <stdio.h>\nint main(void) {",
    "The quick brown fox",
]
TEXTS = ["def add(a, b):\n    return a + b\n", "#include <stdio.h>\nint main(void) { return 0; }\n",
         "NAME\n  ls - list directory contents\n", "The quick brown fox jumps over the lazy dog.\n"] * 4


def _leaf_bytes(pack: Path) -> set[int]:
    from smoe_gguf.pack import manifest as mf

    return {sum(p.length for p in lf.parts) for lf in mf.load(pack).leaves}


def test_widened_tiny_model_gives_the_same_tokens_and_4x_leaves(tiny_model: Callable[[str, str], Path],
                                                                tmp_path: Path) -> None:
    src = tiny_model("qwen3moe", "f16")
    wide = widen_experts(src, tmp_path / "wide.gguf", 4)
    a, b = read_layout(src), read_layout(wide)
    n_ff = int(a.value("qwen3moe.expert_feed_forward_length"))
    assert int(b.value("qwen3moe.expert_feed_forward_length")) == 4 * n_ff and int(b.value(WIDEN_KEY)) == n_ff
    shapes = {t.name: t.shape for t in b.tensors}
    for t in a.tensors:
        if "_exps." in t.name:
            side = 0 if "down" in t.name else 1
            assert shapes[t.name][side] == 4 * t.shape[side] and shapes[t.name][2] == t.shape[2]
        else:
            assert shapes[t.name] == t.shape
    cmp = compare_models(src, wide, PROMPTS, 16)
    assert cmp.same_greedy_tokens and cmp.same_sampled_tokens and cmp.positions == 2 * 3 * 16
    # this model's n_ff (68) is not a multiple of llama.cpp's F16 dot-product step: the zeros move
    # a few terms of each sum from the scalar tail into the vector part, so the sums may round
    # differently, by little
    assert cmp.max_abs_logit_diff <= 0.01 * cmp.logit_std
    split(src, tmp_path / "src.pack")
    split(wide, tmp_path / "wide.pack")
    small, big = _leaf_bytes(tmp_path / "src.pack"), _leaf_bytes(tmp_path / "wide.pack")
    assert len(small) == 1 and big == {4 * next(iter(small))}


def test_widening_is_bit_exact_where_n_ff_is_a_multiple_of_the_dot_product_step(tmp_path: Path) -> None:
    tok = rm.train_tokenizer(TEXTS, 300)
    cfg = rm.ModelConfig(n_vocab=tok.n_vocab, n_layer=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=16,
                         n_expert=16, n_used=2, n_ff_exp=64, n_ctx_train=256)
    src = rm.write_gguf(tmp_path / "ref.gguf", cfg, rm.init_weights(cfg, seed=3, std=0.25), tok, dtype="f16")
    wide = widen_experts(src, tmp_path / "ref-x4.gguf", 4)
    cmp = compare_models(src, wide, PROMPTS, 16)
    assert cmp.same_greedy_tokens and cmp.same_sampled_tokens and cmp.max_abs_logit_diff == 0.0
    # widening a widened model keeps the first source width
    again = widen_experts(wide, tmp_path / "ref-x8.gguf", 2)
    assert int(read_layout(again).value(WIDEN_KEY)) == 64
    assert int(read_layout(again).value("qwen3moe.expert_feed_forward_length")) == 512


def test_widening_refuses_quantized_experts(tiny_model: Callable[[str, str], Path], tmp_path: Path) -> None:
    with pytest.raises(SmoeError, match="F32, F16 and BF16 experts only"):
        widen_experts(tiny_model("qwen3moe", "q8_0"), tmp_path / "x.gguf", 2)
    with pytest.raises(SmoeError, match="at least 1"):
        widen_experts(tiny_model("qwen3moe", "f16"), tmp_path / "x.gguf", 0)
    assert not (tmp_path / "x.gguf").exists()
