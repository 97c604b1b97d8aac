"""Seeded random MoE GGUFs in llama.cpp's real architectures, for tests and benchmarks.

``build_test_model(path, arch, preset, dtype, seed)`` writes a GGUF that stock llama.cpp loads
and generates with. Same arguments -> byte-identical file. The weights are random normal:
token embeddings std 1, matrices std 1/sqrt(fan_in) (Q/K x QK_GAIN), biases 0.02, norms 1
(qwen3moe's q/k norms QK_GAIN). Values stay far from F16's limits, every layer (experts
included) changes the greedy tokens, and routing differs from token to token. Each tensor is
generated from a seed derived from (seed, tensor name) and written at once, so memory stays
bounded by the largest tensor even for the ``medium`` preset.

Each architecture has the layout its real models have where paging sees it: layers without
experts (deepseek2's and glm4moe's leading dense layers, llama4's every other layer), shared
experts, expert-selection biases, MTP blocks (glm4moe), and the routing function llama.cpp
uses for it (sigmoid over expert groups for deepseek2, top-1 for llama4).

Tensor types follow llama.cpp's converter: 1-D tensors, norms, routers (``ffn_gate_inp``) and
biases are F32; every other weight is in the requested dtype. The quantized dtypes are built
as F16 next to the target and quantized by llama.cpp itself (``quantize.py``): ``q8_0``,
``q4_k`` (Q4_K_S), ``q4_k_m`` (the Q4_K_M mix: some layers' down parts Q6_K), ``iq4_xs`` and
``mxfp4`` (MXFP4 experts, Q8_0 elsewhere).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np

from smoe_gguf.errors import SmoeError

ARCHS: tuple[str, ...] = ("qwen3moe", "qwen2moe", "mixtral", "gpt-oss", "deepseek2", "glm4moe", "granitemoe",
                          "olmoe", "dbrx", "llama4", "qwen3next")
PRESETS: tuple[str, ...] = ("tiny", "medium")
DTYPES: tuple[str, ...] = ("f32", "f16", "q8_0", "q4_k", "q4_k_m", "iq4_xs", "mxfp4")
# The (arch, dtype) pairs the tests build and run: every dtype of the first four architectures,
# F16 of every other one, and the real quant mixes: Q4_K_M with experts in every layer and with
# dense first layers, IQ4_XS, and the MXFP4 experts gpt-oss ships with.
CASES: tuple[tuple[str, str], ...] = (
    *((a, d) for a in ARCHS[:4] for d in ("f32", "f16", "q8_0", "q4_k")),
    *((a, "f16") for a in ARCHS[4:]),
    ("qwen3moe", "q4_k_m"), ("deepseek2", "q4_k_m"),
    ("mixtral", "iq4_xs"),
    ("gpt-oss", "mxfp4"),
)

EMBED_STD = 1.0
BIAS_STD = 0.02
EXP_BIAS_STD = 0.1  # the expert-selection bias (exp_probs_b): large enough to change some choices
# Sharpens attention (Q/K matrices, or qwen3moe's q/k norms, scaled by this): with uniform
# attention the next token depends on the current one only and greedy decoding falls into
# 2-3 token loops on the deeper presets; with it, 64 greedy tokens hold ~50-60 distinct ones.
QK_GAIN = 3.0
_QUANTIZED = {"q8_0", "q4_k", "q4_k_m", "iq4_xs", "mxfp4"}
_BLOCK_256 = {"q4_k", "q4_k_m", "iq4_xs"}  # K-quant / IQ4_XS rows are blocks of 256 values
_BLOCK_32 = {"q8_0", "mxfp4"}

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Shape:
    """Hyper-parameters of one test model."""

    n_layer: int  # decoder blocks (without MTP blocks)
    n_expert: int
    n_used: int
    n_embd: int
    n_ff_exp: int
    n_head: int
    n_head_kv: int
    head_dim: int  # deepseek2: the MLA query/key head size (nope + rope)
    n_ff_shexp: int = 0  # shared expert width (qwen2moe, qwen3next; n_ff_exp x 1 elsewhere)
    n_ctx_train: int = 4096
    n_swa: int = 128  # gpt-oss sliding window
    n_ff: int = 0  # the dense FFN of layers without experts
    n_dense_lead: int = 0  # leading layers without experts (deepseek2, glm4moe)
    moe_step: int = 0  # llama4: experts in every moe_step-th layer
    n_nextn: int = 0  # glm4moe: MTP blocks after the decoder (llama.cpp does not load them)
    rope_dim: int = 0  # rotary dimensions when fewer than head_dim
    v_head_dim: int = 0  # deepseek2: the MLA value head size
    q_lora: int = 0  # deepseek2
    kv_lora: int = 0  # deepseek2
    n_group: int = 0  # deepseek2: expert groups
    n_group_used: int = 0
    ssm_state: int = 0  # qwen3next linear attention: head size
    ssm_k_heads: int = 0
    ssm_v_heads: int = 0
    full_attn_interval: int = 0  # qwen3next: every n-th layer has full attention, the others linear


# f32/f16 shapes: n_ff_exp is deliberately not a power of two, so an expert's slice of a
# merged tensor (n_embd * n_ff_exp * itemsize bytes) is not a multiple of 4096.
_TINY: dict[str, Shape] = {
    "qwen3moe": Shape(n_layer=4, n_expert=16, n_used=4, n_embd=128, n_ff_exp=68, n_head=4, n_head_kv=2, head_dim=32),
    "qwen2moe": Shape(n_layer=3, n_expert=12, n_used=3, n_embd=128, n_ff_exp=72, n_head=4, n_head_kv=2, head_dim=32,
                      n_ff_shexp=160),
    "mixtral": Shape(n_layer=2, n_expert=8, n_used=2, n_embd=128, n_ff_exp=100, n_head=4, n_head_kv=2, head_dim=32),
    "gpt-oss": Shape(n_layer=2, n_expert=16, n_used=4, n_embd=128, n_ff_exp=72, n_head=4, n_head_kv=2, head_dim=32,
                     n_swa=32),
    # DeepSeek-V3: MLA (one latent KV head), a leading dense layer, one shared expert,
    # sigmoid routing with an expert bias, over the 2 best of 4 expert groups.
    "deepseek2": Shape(n_layer=3, n_expert=16, n_used=4, n_embd=128, n_ff_exp=72, n_head=4, n_head_kv=1, head_dim=48,
                       n_ff=160, n_dense_lead=1, rope_dim=16, v_head_dim=32, q_lora=64, kv_lora=64, n_group=4,
                       n_group_used=2),
    # GLM-4.5: a leading dense layer, one shared expert, sigmoid + expert bias, one MTP block.
    "glm4moe": Shape(n_layer=3, n_expert=16, n_used=4, n_embd=128, n_ff_exp=72, n_head=4, n_head_kv=2, head_dim=32,
                     n_ff=160, n_dense_lead=1, n_nextn=1, rope_dim=16),
    "granitemoe": Shape(n_layer=2, n_expert=16, n_used=4, n_embd=128, n_ff_exp=80, n_head=4, n_head_kv=2, head_dim=32),
    "olmoe": Shape(n_layer=2, n_expert=16, n_used=4, n_embd=128, n_ff_exp=88, n_head=4, n_head_kv=4, head_dim=32),
    "dbrx": Shape(n_layer=2, n_expert=16, n_used=4, n_embd=128, n_ff_exp=76, n_head=4, n_head_kv=2, head_dim=32),
    # Llama 4 Maverick: experts in every other layer, top-1 routing, one shared expert.
    "llama4": Shape(n_layer=4, n_expert=16, n_used=1, n_embd=128, n_ff_exp=84, n_head=4, n_head_kv=2, head_dim=32,
                    n_ff=160, moe_step=2),
    # Qwen3-Next: a gated-delta-net (linear attention) layer, then a gated full-attention one
    # (the real model has three linear layers to each full one).
    "qwen3next": Shape(n_layer=2, n_expert=16, n_used=4, n_embd=128, n_ff_exp=56, n_head=4, n_head_kv=2, head_dim=32,
                       n_ff_shexp=96, rope_dim=8, ssm_state=32, ssm_k_heads=2, ssm_v_heads=4, full_attn_interval=2),
}

_MEDIUM = Shape(n_layer=8, n_expert=64, n_used=8, n_embd=1024, n_ff_exp=512, n_head=16, n_head_kv=4, head_dim=64)
# Per architecture, what the medium preset changes (8 layers with experts in each).
_MEDIUM_EXTRA: dict[str, dict[str, int]] = {
    "qwen2moe": {"n_ff_shexp": 1024},
    "deepseek2": {"n_layer": 9, "n_dense_lead": 1, "n_ff": 2048, "n_head_kv": 1, "head_dim": 96, "rope_dim": 32,
                  "v_head_dim": 64, "q_lora": 256, "kv_lora": 256, "n_group": 8, "n_group_used": 4},
    "glm4moe": {"n_layer": 9, "n_dense_lead": 1, "n_ff": 2048, "n_nextn": 1, "rope_dim": 32},
    "olmoe": {"n_head_kv": 16},
    "llama4": {"n_layer": 16, "moe_step": 2, "n_ff": 2048, "n_used": 1},
    "qwen3next": {"n_ff_shexp": 512, "rope_dim": 16, "ssm_state": 64, "ssm_k_heads": 4, "ssm_v_heads": 8,
                  "full_attn_interval": 4},
}


def preset_shape(arch: str, preset: str, dtype: str) -> Shape:
    """The shape ``build_test_model`` uses for (arch, preset, dtype)."""
    _check_choice("arch", arch, ARCHS)
    _check_choice("preset", preset, PRESETS)
    _check_choice("dtype", dtype, DTYPES)
    if preset == "medium":
        return replace(_MEDIUM, **_MEDIUM_EXTRA.get(arch, {}))
    shape = _TINY[arch]
    if dtype in _BLOCK_32:  # Q8_0 / MXFP4 rows are blocks of 32 values
        return replace(shape, n_ff_exp=_round_up(shape.n_ff_exp, 32), n_ff_shexp=_round_up(shape.n_ff_shexp, 32),
                       n_ff=_round_up(shape.n_ff, 32))
    if dtype in _BLOCK_256:  # the expert matrices' rows are whole blocks of 256 values
        head_dim = shape.head_dim if arch == "deepseek2" else 64
        return replace(shape, n_embd=256, head_dim=head_dim, n_ff_exp=256, n_ff_shexp=256 if shape.n_ff_shexp else 0,
                       n_ff=256 if shape.n_ff else 0, ssm_state=64 if shape.ssm_state else 0)
    return shape


def moe_layers(arch: str, s: Shape) -> list[int]:
    """The blocks that hold routed experts (MTP blocks included)."""
    n = s.n_layer + s.n_nextn
    if s.moe_step > 1:
        return [i for i in range(n) if (i + 1) % s.moe_step == 0]
    return list(range(s.n_dense_lead, n))


def build_test_model(
    path: str | os.PathLike[str],
    arch: str,
    preset: str = "tiny",
    dtype: str = "f16",
    seed: int = 0,
    progress: Progress | None = None,
) -> Path:
    """Write a random MoE GGUF to ``path`` atomically and return its path.

    ``progress(done, total)`` is called with tensor bytes generated so far (F16 bytes for
    the quantized dtypes, which are quantized afterwards).
    """
    shape = preset_shape(arch, preset, dtype)
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(dst, ".part")
    f16_tmp = _temp_path(dst, ".f16.part") if dtype in _QUANTIZED else None
    try:
        if f16_tmp is None:
            _write_gguf(tmp, arch, preset, shape, dtype, seed, progress)
        else:
            _write_gguf(f16_tmp, arch, preset, shape, "f16", seed, progress)
            from smoe_gguf.devtools.quantize import quantize  # loads libllama: only when needed

            quantize(f16_tmp, tmp, dtype)
        os.chmod(tmp, 0o644)  # mkstemp made it 0600
        os.replace(tmp, dst)
    finally:
        for p in (tmp, f16_tmp):
            if p is not None:
                p.unlink(missing_ok=True)
    return dst


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SmoeError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _temp_path(dst: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=suffix, dir=dst.parent)
    os.close(fd)
    return Path(name)


# --- tensors -------------------------------------------------------------------------------

# What a tensor holds: "norm" = ones (F32), "f32" = random F32 (routers, biases, sinks),
# "w" = random in the model's dtype, "decay" = negative F32 (qwen3next's ssm_a).
@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order: the ggml shape reversed
    kind: str


def _tensor_plan(arch: str, s: Shape, n_vocab: int) -> list[_Tensor]:
    plan = [_Tensor("token_embd.weight", (n_vocab, s.n_embd), "w")]
    moe = set(moe_layers(arch, s))
    layer_plan = _LAYER_PLANS.get(arch, _layer_plan)
    for i in range(s.n_layer + s.n_nextn):
        plan += layer_plan(arch, s, i, i in moe)
    plan.append(_Tensor("output_norm.weight", (s.n_embd,), "norm"))
    plan.append(_Tensor("output.weight", (n_vocab, s.n_embd), "w"))
    return plan


def _layer_plan(arch: str, s: Shape, i: int, moe: bool) -> list[_Tensor]:
    """qwen3moe, qwen2moe, mixtral (llama) and gpt-oss."""
    p = f"blk.{i}."
    q_dim, kv_dim = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    e, ff, d = s.n_expert, s.n_ff_exp, s.n_embd
    t = _attn_qkvo(p, d, q_dim, kv_dim)
    if arch == "qwen3moe":
        t += [_Tensor(p + "attn_q_norm.weight", (s.head_dim,), "norm"),
              _Tensor(p + "attn_k_norm.weight", (s.head_dim,), "norm")]
    if arch == "qwen2moe":
        t += [_Tensor(p + "attn_q.bias", (q_dim,), "f32"),
              _Tensor(p + "attn_k.bias", (kv_dim,), "f32"),
              _Tensor(p + "attn_v.bias", (kv_dim,), "f32")]
    if arch == "gpt-oss":
        t += [_Tensor(p + "attn_output.bias", (d,), "f32"),
              _Tensor(p + "attn_sinks.weight", (s.n_head,), "f32"),
              _Tensor(p + "post_attention_norm.weight", (d,), "norm"),
              _Tensor(p + "ffn_gate_inp.bias", (e,), "f32")]
    else:
        t.append(_Tensor(p + "ffn_norm.weight", (d,), "norm"))
    t += [_Tensor(p + "ffn_gate_inp.weight", (e, d), "f32"), *_experts(p, e, ff, d)]
    if arch == "gpt-oss":
        t += [_Tensor(p + "ffn_gate_exps.bias", (e, ff), "f32"),
              _Tensor(p + "ffn_up_exps.bias", (e, ff), "f32"),
              _Tensor(p + "ffn_down_exps.bias", (e, d), "f32")]
    if arch == "qwen2moe":
        t += [_Tensor(p + "ffn_gate_inp_shexp.weight", (d,), "f32"), *_ffn(p, "_shexp", s.n_ff_shexp, d)]
    return t


def _attn_qkvo(p: str, d: int, q_dim: int, kv_dim: int, o_in: int | None = None) -> list[_Tensor]:
    return [
        _Tensor(p + "attn_norm.weight", (d,), "norm"),
        _Tensor(p + "attn_q.weight", (q_dim, d), "w"),
        _Tensor(p + "attn_k.weight", (kv_dim, d), "w"),
        _Tensor(p + "attn_v.weight", (kv_dim, d), "w"),
        _Tensor(p + "attn_output.weight", (d, q_dim if o_in is None else o_in), "w"),
    ]


def _experts(p: str, e: int, ff: int, d: int) -> list[_Tensor]:
    return [_Tensor(p + "ffn_gate_exps.weight", (e, ff, d), "w"),
            _Tensor(p + "ffn_up_exps.weight", (e, ff, d), "w"),
            _Tensor(p + "ffn_down_exps.weight", (e, d, ff), "w")]


def _ffn(p: str, suffix: str, ff: int, d: int) -> list[_Tensor]:
    """A dense SwiGLU FFN (``suffix`` "" for a dense layer, "_shexp" for a shared expert)."""
    return [_Tensor(p + f"ffn_gate{suffix}.weight", (ff, d), "w"),
            _Tensor(p + f"ffn_up{suffix}.weight", (ff, d), "w"),
            _Tensor(p + f"ffn_down{suffix}.weight", (d, ff), "w")]


def _deepseek2_layer(arch: str, s: Shape, i: int, moe: bool) -> list[_Tensor]:
    p, d, h = f"blk.{i}.", s.n_embd, s.n_head
    rope = s.rope_dim or s.head_dim
    t = [
        _Tensor(p + "attn_norm.weight", (d,), "norm"),
        _Tensor(p + "attn_q_a_norm.weight", (s.q_lora,), "norm"),
        _Tensor(p + "attn_kv_a_norm.weight", (s.kv_lora,), "norm"),
        _Tensor(p + "attn_q_a.weight", (s.q_lora, d), "w"),
        _Tensor(p + "attn_q_b.weight", (h * s.head_dim, s.q_lora), "w"),
        _Tensor(p + "attn_kv_a_mqa.weight", (s.kv_lora + rope, d), "w"),
        _Tensor(p + "attn_k_b.weight", (h, s.kv_lora, s.head_dim - rope), "w"),
        _Tensor(p + "attn_v_b.weight", (h, s.v_head_dim, s.kv_lora), "w"),
        _Tensor(p + "attn_output.weight", (d, h * s.v_head_dim), "w"),
        _Tensor(p + "ffn_norm.weight", (d,), "norm"),
    ]
    if not moe:
        return t + _ffn(p, "", s.n_ff, d)
    return t + [_Tensor(p + "ffn_gate_inp.weight", (s.n_expert, d), "f32"),
                _Tensor(p + "exp_probs_b.bias", (s.n_expert,), "f32"),
                *_experts(p, s.n_expert, s.n_ff_exp, d),
                *_ffn(p, "_shexp", s.n_ff_exp, d)]


def _glm4moe_layer(arch: str, s: Shape, i: int, moe: bool) -> list[_Tensor]:
    p, d = f"blk.{i}.", s.n_embd
    q_dim, kv_dim = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    t = _attn_qkvo(p, d, q_dim, kv_dim) + [
        _Tensor(p + "attn_q.bias", (q_dim,), "f32"),
        _Tensor(p + "attn_k.bias", (kv_dim,), "f32"),
        _Tensor(p + "attn_v.bias", (kv_dim,), "f32"),
        _Tensor(p + "attn_q_norm.weight", (s.head_dim,), "norm"),
        _Tensor(p + "attn_k_norm.weight", (s.head_dim,), "norm"),
        _Tensor(p + "post_attention_norm.weight", (d,), "norm"),
    ]
    if not moe:
        t += _ffn(p, "", s.n_ff, d)
    else:
        t += [_Tensor(p + "ffn_gate_inp.weight", (s.n_expert, d), "f32"),
              _Tensor(p + "exp_probs_b.bias", (s.n_expert,), "f32"),
              *_experts(p, s.n_expert, s.n_ff_exp, d),
              *_ffn(p, "_shexp", s.n_ff_exp, d)]
    if i >= s.n_layer:  # the MTP block
        t += [_Tensor(p + "nextn.eh_proj.weight", (d, 2 * d), "w"),
              _Tensor(p + "nextn.enorm.weight", (d,), "norm"),
              _Tensor(p + "nextn.hnorm.weight", (d,), "norm"),
              _Tensor(p + "nextn.shared_head_norm.weight", (d,), "norm")]
    return t


def _plain_moe_layer(arch: str, s: Shape, i: int, moe: bool) -> list[_Tensor]:
    """granitemoe, olmoe, dbrx: experts in every layer, no shared expert."""
    p, d = f"blk.{i}.", s.n_embd
    q_dim, kv_dim = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    if arch == "dbrx":
        t = [_Tensor(p + "attn_norm.weight", (d,), "norm"),
             _Tensor(p + "attn_qkv.weight", (q_dim + 2 * kv_dim, d), "w"),
             _Tensor(p + "attn_output.weight", (d, q_dim), "w"),
             _Tensor(p + "attn_output_norm.weight", (d,), "norm")]
    else:
        t = _attn_qkvo(p, d, q_dim, kv_dim)
        if arch == "olmoe":
            t += [_Tensor(p + "attn_q_norm.weight", (q_dim,), "norm"),
                  _Tensor(p + "attn_k_norm.weight", (kv_dim,), "norm")]
        t.append(_Tensor(p + "ffn_norm.weight", (d,), "norm"))
    return t + [_Tensor(p + "ffn_gate_inp.weight", (s.n_expert, d), "f32"), *_experts(p, s.n_expert, s.n_ff_exp, d)]


def _llama4_layer(arch: str, s: Shape, i: int, moe: bool) -> list[_Tensor]:
    p, d = f"blk.{i}.", s.n_embd
    t = _attn_qkvo(p, d, s.n_head * s.head_dim, s.n_head_kv * s.head_dim)
    t.append(_Tensor(p + "ffn_norm.weight", (d,), "norm"))
    if not moe:
        return t + _ffn(p, "", s.n_ff, d)
    return t + [_Tensor(p + "ffn_gate_inp.weight", (s.n_expert, d), "f32"),
                *_experts(p, s.n_expert, s.n_ff_exp, d),
                *_ffn(p, "_shexp", s.n_ff_exp, d)]


SSM_CONV_KERNEL = 4


def _qwen3next_layer(arch: str, s: Shape, i: int, moe: bool) -> list[_Tensor]:
    p, d = f"blk.{i}.", s.n_embd
    t = [_Tensor(p + "attn_norm.weight", (d,), "norm"),
         _Tensor(p + "post_attention_norm.weight", (d,), "norm")]
    if (i + 1) % s.full_attn_interval == 0:  # gated full attention: Q and its gate in one matrix
        q_dim, kv_dim = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
        t += [_Tensor(p + "attn_q.weight", (2 * q_dim, d), "w"),
              _Tensor(p + "attn_k.weight", (kv_dim, d), "w"),
              _Tensor(p + "attn_v.weight", (kv_dim, d), "w"),
              _Tensor(p + "attn_output.weight", (d, q_dim), "w"),
              _Tensor(p + "attn_q_norm.weight", (s.head_dim,), "norm"),
              _Tensor(p + "attn_k_norm.weight", (s.head_dim,), "norm")]
    else:  # gated delta net (linear attention)
        key_dim, value_dim = s.ssm_state * s.ssm_k_heads, s.ssm_state * s.ssm_v_heads
        t += [_Tensor(p + "attn_qkv.weight", (2 * key_dim + value_dim, d), "w"),
              _Tensor(p + "attn_gate.weight", (value_dim, d), "w"),
              _Tensor(p + "ssm_conv1d.weight", (2 * key_dim + value_dim, SSM_CONV_KERNEL), "f32"),
              _Tensor(p + "ssm_dt.bias", (s.ssm_v_heads,), "f32"),
              _Tensor(p + "ssm_a", (s.ssm_v_heads,), "decay"),
              _Tensor(p + "ssm_ba.weight", (2 * s.ssm_v_heads, d), "w"),
              _Tensor(p + "ssm_norm.weight", (s.ssm_state,), "norm"),
              _Tensor(p + "ssm_out.weight", (d, value_dim), "w")]
    return t + [_Tensor(p + "ffn_gate_inp.weight", (s.n_expert, d), "f32"),
                *_experts(p, s.n_expert, s.n_ff_exp, d),
                _Tensor(p + "ffn_gate_inp_shexp.weight", (d,), "f32"),
                *_ffn(p, "_shexp", s.n_ff_shexp, d)]


_LAYER_PLANS: dict[str, Callable[[str, Shape, int, bool], list[_Tensor]]] = {
    "deepseek2": _deepseek2_layer,
    "glm4moe": _glm4moe_layer,
    "granitemoe": _plain_moe_layer,
    "olmoe": _plain_moe_layer,
    "dbrx": _plain_moe_layer,
    "llama4": _llama4_layer,
    "qwen3next": _qwen3next_layer,
}


def _np_dtype(kind: str, dtype: str) -> type[np.floating]:
    if kind == "w" and dtype == "f16":
        return np.float16
    return np.float32


def _nbytes(t: _Tensor, dtype: str) -> int:
    return int(np.prod(t.shape)) * np.dtype(_np_dtype(t.kind, dtype)).itemsize


def _std(t: _Tensor) -> float:
    """Embeddings std 1, biases/sinks 0.02, matrices 1/sqrt(fan_in) (so every layer matters)."""
    if t.name == "token_embd.weight":
        return EMBED_STD
    if "exp_probs_b" in t.name:
        return EXP_BIAS_STD
    if t.name.endswith(".bias") or "attn_sinks" in t.name:
        return BIAS_STD
    gain = QK_GAIN if t.name.endswith(("attn_q.weight", "attn_k.weight", "attn_qkv.weight")) else 1.0
    return gain / float(np.sqrt(t.shape[-1]))


def _tensor_data(t: _Tensor, dtype: str, seed: int) -> np.ndarray:
    if t.kind == "norm":
        qk_norm = t.name.endswith(("attn_q_norm.weight", "attn_k_norm.weight"))
        return np.full(t.shape, QK_GAIN if qk_norm else 1.0, dtype=np.float32)
    digest = hashlib.sha256(t.name.encode()).digest()
    rng = np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])
    data = rng.standard_normal(t.shape, dtype=np.float32)
    if t.kind == "decay":  # A = -exp(A_log): every state decays
        return -np.exp(np.float32(0.5) * data)
    data *= np.float32(_std(t))
    return data.astype(_np_dtype(t.kind, dtype), copy=False)


# --- metadata ------------------------------------------------------------------------------


def _gguf_arch(arch: str) -> str:
    return "llama" if arch == "mixtral" else arch


# Keys of the architectures whose hyper-parameters go beyond the common set.
GATING_SIGMOID = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID
ROUTED_SCALE = 2.5  # DeepSeek-V3 / GLM-4.5 routed_scaling_factor


def add_hparams(w: gguf.GGUFWriter, arch: str, s: Shape) -> None:
    a = _gguf_arch(arch)
    mla = arch == "deepseek2"
    w.add_uint32(f"{a}.context_length", s.n_ctx_train)
    w.add_uint32(f"{a}.embedding_length", s.n_embd)
    w.add_uint32(f"{a}.block_count", s.n_layer + s.n_nextn)
    w.add_uint32(f"{a}.feed_forward_length", s.n_ff or s.n_ff_exp)
    w.add_uint32(f"{a}.attention.head_count", s.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", s.n_head_kv)
    rope = s.rope_dim or s.head_dim
    # MLA caches the latent KV (kv_lora) and the rotary key part: those are its key/value lengths.
    w.add_uint32(f"{a}.attention.key_length", s.kv_lora + rope if mla else s.head_dim)
    w.add_uint32(f"{a}.attention.value_length", s.kv_lora if mla else s.head_dim)
    if arch == "dbrx":
        w.add_float32(f"{a}.attention.layer_norm_epsilon", 1e-5)
        w.add_float32(f"{a}.attention.clamp_kqv", 8.0)
    else:
        w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32(f"{a}.rope.dimension_count", rope)
    w.add_float32(f"{a}.rope.freq_base", 10000.0)
    w.add_uint32(f"{a}.expert_count", s.n_expert)
    w.add_uint32(f"{a}.expert_used_count", s.n_used)
    if arch not in ("mixtral", "granitemoe", "olmoe", "dbrx"):  # these size experts by feed_forward_length
        w.add_uint32(f"{a}.expert_feed_forward_length", s.n_ff_exp)
    if arch in ("qwen2moe", "qwen3next"):
        w.add_uint32(f"{a}.expert_shared_feed_forward_length", s.n_ff_shexp)
    if arch == "gpt-oss":
        w.add_uint32(f"{a}.attention.sliding_window", s.n_swa)
    if arch in ("deepseek2", "glm4moe"):
        w.add_uint32(f"{a}.leading_dense_block_count", s.n_dense_lead)
        w.add_uint32(f"{a}.expert_shared_count", 1)
        w.add_float32(f"{a}.expert_weights_scale", ROUTED_SCALE)
        w.add_bool(f"{a}.expert_weights_norm", True)
        w.add_uint32(f"{a}.expert_gating_func", GATING_SIGMOID)
    if mla:
        w.add_uint32(f"{a}.attention.q_lora_rank", s.q_lora)
        w.add_uint32(f"{a}.attention.kv_lora_rank", s.kv_lora)
        w.add_uint32(f"{a}.attention.key_length_mla", s.head_dim)
        w.add_uint32(f"{a}.attention.value_length_mla", s.v_head_dim)
        w.add_uint32(f"{a}.expert_group_count", s.n_group)
        w.add_uint32(f"{a}.expert_group_used_count", s.n_group_used)
    if s.n_nextn:
        w.add_uint32(f"{a}.nextn_predict_layers", s.n_nextn)
    if arch == "granitemoe":  # Granite's multipliers (attention scale 1/head_dim, as Granite 3 has)
        w.add_float32(f"{a}.logit_scale", 6.0)
        w.add_float32(f"{a}.residual_scale", 0.22)
        w.add_float32(f"{a}.embedding_scale", 12.0)
        w.add_float32(f"{a}.attention.scale", 1.0 / s.head_dim)
    if arch == "llama4":
        w.add_uint32(f"{a}.interleave_moe_layer_step", s.moe_step)
    if arch == "qwen3next":
        w.add_uint32(f"{a}.ssm.conv_kernel", SSM_CONV_KERNEL)
        w.add_uint32(f"{a}.ssm.inner_size", s.ssm_state * s.ssm_v_heads)
        w.add_uint32(f"{a}.ssm.state_size", s.ssm_state)
        w.add_uint32(f"{a}.ssm.time_step_rank", s.ssm_v_heads)
        w.add_uint32(f"{a}.ssm.group_count", s.ssm_k_heads)
        w.add_uint32(f"{a}.full_attention_interval", s.full_attn_interval)


def _write_gguf(path: Path, arch: str, preset: str, s: Shape, dtype: str, seed: int,
                progress: Progress | None) -> None:
    tokens, types, merges, special = _vocab()
    plan = _tensor_plan(arch, s, len(tokens))
    w = gguf.GGUFWriter(path, _gguf_arch(arch))
    try:
        w.add_name(f"smoe-test {arch} {preset} seed {seed}")
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        add_hparams(w, arch, s)
        _add_tokenizer(w, tokens, types, merges, special)
        for t in plan:
            w.add_tensor_info(t.name, t.shape, np.dtype(_np_dtype(t.kind, dtype)), _nbytes(t, dtype))
        total = sum(_nbytes(t, dtype) for t in plan)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        done = 0
        for t in plan:
            data = _tensor_data(t, dtype, seed)
            w.write_tensor_data(data)
            done += data.nbytes
            if progress is not None:
                progress(done, total)
        w.flush()
    finally:
        w.close()


# --- tokenizer -----------------------------------------------------------------------------

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
N_MERGES = 240
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A fixed English text the BPE merges are learned from (deterministic, independent of seed).
_CORPUS = """\
The quick brown fox jumps over the lazy dog. In the beginning there was the word, and the word
was with the model. A mixture of experts is a network in which a router chooses, for every token,
a few experts out of many; only the chosen experts are computed, so the model can be large while
each token costs little. The router is a small matrix that gives every expert a score, and the
experts with the highest scores are the ones that run. This is the reason why the experts of a
large model do not all need to be in memory at the same time: the ones that are not chosen can
wait on the disk until they are needed. When the memory is full, the expert that was used least
recently is the one that is sent back. It is important that the answer of the model is exactly
the same as the answer of the original program, bit for bit, for every prompt and every token.
What is the capital of France? The capital of France is Paris. Write a function that returns the
sum of two numbers. def add(a, b): return a + b. for i in range(10): print(i). Once upon a time,
there was a little girl who lived in a village near the forest. She would often go to the river
and sit there for hours, thinking about the world and the people in it. Hello, how are you today?
I am fine, thank you, and you? The weather is nice and the sun is shining. We are going to the
market to buy some bread, some cheese and some apples. They have been working on this problem for
a long time, and they think that they have found the solution at last. Numbers: 0 1 2 3 4 5 6 7 8
9 10 100 1000 2024 3.14 42. Questions and answers, reading and writing, learning and teaching.
"""

_PRETOKENIZE = re.compile(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _learn_merges(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training; ties broken by the pair itself so the result is deterministic."""
    b2u = bytes_to_unicode()
    words = Counter("".join(b2u[b] for b in w.encode()) for w in _PRETOKENIZE.findall(text))
    split = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, n in words.items():
            sym = split[w]
            for pair in zip(sym, sym[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w in words:
            split[w] = _apply_merge(split[w], best)
    return merges


def _apply_merge(sym: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(sym):
        if i + 1 < len(sym) and (sym[i], sym[i + 1]) == pair:
            out.append(sym[i] + sym[i + 1])
            i += 2
        else:
            out.append(sym[i])
            i += 1
    return out


_VOCAB_CACHE: tuple[list[str], list[int], list[str], dict[str, int]] | None = None


def _vocab() -> tuple[list[str], list[int], list[str], dict[str, int]]:
    """(tokens, token types, merges, special token ids): 256 byte tokens, merges, specials."""
    global _VOCAB_CACHE
    if _VOCAB_CACHE is None:
        tokens = [bytes_to_unicode()[b] for b in range(256)]
        merges = _learn_merges(_CORPUS, N_MERGES)
        seen = set(tokens)
        for a, b in merges:
            if a + b not in seen:
                seen.add(a + b)
                tokens.append(a + b)
        types = [int(gguf.TokenType.NORMAL)] * len(tokens)
        special = {}
        for s in SPECIAL_TOKENS:
            special[s] = len(tokens)
            tokens.append(s)
            types.append(int(gguf.TokenType.CONTROL))
        _VOCAB_CACHE = (tokens, types, [f"{a} {b}" for a, b in merges], special)
    return _VOCAB_CACHE


def _add_tokenizer(w: gguf.GGUFWriter, tokens: list[str], types: list[int], merges: list[str],
                   special: dict[str, int]) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(special["<|endoftext|>"])
    w.add_eos_token_id(special["<|im_end|>"])
    w.add_pad_token_id(special["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
