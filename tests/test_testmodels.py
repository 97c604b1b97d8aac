"""Test models: stock llama.cpp loads them, they are deterministic, routed and varied."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from smoe_gguf.devtools import stock
from smoe_gguf.devtools.testmodels import ARCHS, CASES, build_test_model, moe_layers, preset_shape
from smoe_gguf.errors import SmoeError

ALL = list(CASES)
# The types llama.cpp's quantizer gives the expert tensors (Q4_K_M: the down part of some layers Q6_K).
EXPERT_TYPES = {"f32": {"F32"}, "f16": {"F16"}, "q8_0": {"Q8_0"}, "q4_k": {"Q4_K"}, "q4_k_m": {"Q4_K", "Q6_K"},
                "iq4_xs": {"IQ4_XS"}, "mxfp4": {"MXFP4"}}
GGUF_ARCH = {"mixtral": "llama"}
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("arch,dtype", ALL)
def test_tiny_model_layout(arch: str, dtype: str, tiny_model) -> None:
    path = tiny_model(arch, dtype)
    assert path.stat().st_size < 50 * 2**20
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == GGUF_ARCH.get(arch, arch)
    shape = preset_shape(arch, "tiny", dtype)
    tensors = {t.name: t for t in reader.tensors}
    types: dict[str, set[str]] = {"gate": set(), "up": set(), "down": set()}
    moe = moe_layers(arch, shape)
    for layer in range(shape.n_layer + shape.n_nextn):
        assert tensors[f"blk.{layer}.attn_norm.weight"].tensor_type.name == "F32"
        if layer not in moe:  # a dense layer: a plain FFN, nothing to page
            assert f"blk.{layer}.ffn_down.weight" in tensors and f"blk.{layer}.ffn_down_exps.weight" not in tensors
            continue
        for part in types:
            t = tensors[f"blk.{layer}.ffn_{part}_exps.weight"]
            types[part].add(t.tensor_type.name)
            assert int(t.shape[2]) == shape.n_expert  # expert is the outermost dimension
        assert tensors[f"blk.{layer}.ffn_gate_inp.weight"].tensor_type.name == "F32"
    assert set().union(*types.values()) == EXPERT_TYPES[dtype]
    if dtype == "q4_k_m":  # the mix: gate/up Q4_K everywhere, down Q6_K in some layers
        assert types["gate"] == types["up"] == {"Q4_K"} and "Q6_K" in types["down"]


def test_extra_tensors_of_each_arch(tiny_model) -> None:
    assert {"blk.0.ffn_gate_inp_shexp.weight", "blk.0.ffn_down_shexp.weight", "blk.0.attn_q.bias"} <= set(
        _tensors(tiny_model("qwen2moe", "f16")))
    assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= set(_tensors(tiny_model("qwen3moe", "f16")))
    oss = _tensors(tiny_model("gpt-oss", "f16"))
    assert {"blk.0.attn_sinks.weight", "blk.0.ffn_gate_inp.bias"} <= set(oss)
    bias = oss["blk.0.ffn_down_exps.bias"]
    shape = preset_shape("gpt-oss", "tiny", "f16")
    assert bias.tensor_type.name == "F32" and [int(x) for x in bias.shape] == [shape.n_embd, shape.n_expert]
    # DeepSeek-V3: MLA, a dense first layer, a shared expert and the expert-selection bias.
    ds = _tensors(tiny_model("deepseek2", "f16"))
    assert {"blk.0.ffn_down.weight", "blk.0.attn_kv_a_mqa.weight", "blk.0.attn_k_b.weight", "blk.1.attn_q_a.weight",
            "blk.1.ffn_down_shexp.weight", "blk.1.exp_probs_b.bias"} <= set(ds)
    # GLM-4.5: its MTP block (after the decoder) has experts too; llama.cpp does not load it.
    glm = _tensors(tiny_model("glm4moe", "f16"))
    assert {"blk.0.ffn_up.weight", "blk.2.exp_probs_b.bias", "blk.3.nextn.eh_proj.weight",
            "blk.3.ffn_gate_exps.weight"} <= set(glm)
    assert {"blk.0.ffn_up.weight", "blk.1.ffn_up_shexp.weight", "blk.2.ffn_up.weight", "blk.3.ffn_up_exps.weight"} <= set(
        _tensors(tiny_model("llama4", "f16")))
    assert {"blk.0.ssm_a", "blk.0.attn_qkv.weight", "blk.1.attn_q.weight", "blk.1.ffn_gate_inp_shexp.weight"} <= set(
        _tensors(tiny_model("qwen3next", "f16")))
    assert "blk.0.attn_qkv.weight" in _tensors(tiny_model("dbrx", "f16"))


def test_some_tiny_slices_are_not_page_multiples(tiny_model) -> None:
    odd = []
    for arch, dtype in CASES:
        if dtype not in ("f32", "f16"):
            continue
        first = moe_layers(arch, preset_shape(arch, "tiny", dtype))[0]
        t = _tensors(tiny_model(arch, dtype))[f"blk.{first}.ffn_gate_exps.weight"]
        if (int(t.n_bytes) // int(t.shape[2])) % 4096:
            odd.append((arch, dtype))
    assert ("qwen3moe", "f16") in odd and ("qwen3moe", "f32") in odd


@pytest.mark.parametrize("arch,dtype", ALL)
def test_builds_are_byte_identical(arch: str, dtype: str, tiny_model, tmp_path: Path) -> None:
    again = build_test_model(tmp_path / "again.gguf", arch, "tiny", dtype, seed=0)
    assert again.read_bytes() == tiny_model(arch, dtype).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name != "again.gguf"]  # no temp files left


def test_seed_changes_the_weights(tiny_model, tmp_path: Path) -> None:
    other = build_test_model(tmp_path / "seed1.gguf", "qwen3moe", "tiny", "f16", seed=1)
    assert other.read_bytes() != tiny_model("qwen3moe", "f16").read_bytes()


@pytest.mark.parametrize("arch,dtype", ALL)
def test_stock_greedy_is_deterministic_and_varied(arch: str, dtype: str, tiny_model) -> None:
    path = tiny_model(arch, dtype)
    a = stock.greedy(path, PROMPT, n_tokens=16)
    b = stock.greedy(path, PROMPT, n_tokens=16)
    assert len(a.tokens) == 16 and len(a.logits) == 16
    assert a.tokens == b.tokens
    assert all(np.array_equal(x, y) for x, y in zip(a.logits, b.logits))
    assert all(x.dtype == np.float32 and np.isfinite(x).all() for x in a.logits)
    assert len(set(a.tokens)) > 4
    assert all(int(np.argmax(x)) == t for x, t in zip(a.logits, a.tokens))


def test_stock_prompt_as_tokens_matches_text(tiny_model) -> None:
    path = tiny_model("mixtral", "f16")
    tokens = stock.tokenize(path, PROMPT)
    assert tokens[0] == stock.tokenize(path, "<|im_start|>")[0]  # special tokens are parsed
    assert stock.greedy(path, tokens, n_tokens=4).tokens == stock.greedy(path, PROMPT, n_tokens=4).tokens


def test_stock_small_batches_give_the_same_tokens(tiny_model) -> None:
    path = tiny_model("qwen3moe", "f32")
    assert stock.greedy(path, PROMPT, n_tokens=8, n_batch=4, n_ubatch=4).tokens == \
        stock.greedy(path, PROMPT, n_tokens=8).tokens


def test_stock_load_failure_is_a_smoe_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(SmoeError, match="could not load"):
        stock.greedy(bad, "hello", n_tokens=1)
    with pytest.raises(SmoeError, match="no such file"):
        stock.greedy(tmp_path / "missing.gguf", "hello", n_tokens=1)


def test_unknown_choices_are_refused(tmp_path: Path) -> None:
    for kwargs in ({"arch": "gpt2"}, {"arch": "qwen3moe", "preset": "huge"}, {"arch": "qwen3moe", "dtype": "q2_k"}):
        with pytest.raises(SmoeError):
            build_test_model(tmp_path / "x.gguf", **kwargs)
    assert not list(tmp_path.iterdir())


def test_medium_preset_shape() -> None:
    for arch in ARCHS:
        s = preset_shape(arch, "medium", "f16")
        expert_bytes = len(moe_layers(arch, s)) * s.n_expert * 3 * s.n_embd * s.n_ff_exp * 2
        assert s.n_expert >= 64 and expert_bytes >= 2**30
        assert s.n_embd % 256 == 0 and s.n_ff_exp % 256 == 0  # q4_k needs whole K-quant blocks


def test_interrupted_build_leaves_nothing(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []

    def stop(done: int, total: int) -> None:
        calls.append((done, total))
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_test_model(tmp_path / "m.gguf", "qwen2moe", "tiny", "q8_0", progress=stop)
    assert not list(tmp_path.iterdir())
    build_test_model(tmp_path / "m.gguf", "qwen2moe", "tiny", "f16", progress=lambda d, t: calls.append((d, t)))
    assert calls[-1][0] == calls[-1][1] > 0
