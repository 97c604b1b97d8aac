"""Seeded random MoE GGUFs in llama.cpp's real architectures, for tests and benchmarks.

``build_test_model(path, arch, preset, dtype, seed)`` writes a GGUF that stock llama.cpp loads
and generates with. Same arguments -> byte-identical file. The weights are random normal:
token embeddings std 1, matrices std 1/sqrt(fan_in) (Q/K x QK_GAIN), biases 0.02, norms 1
(qwen3moe's q/k norms QK_GAIN). Values stay far from F16's limits, every layer (experts
included) changes the greedy tokens, and routing differs from token to token. Each tensor is
generated from a seed derived from (seed, tensor name) and written at once, so memory stays
bounded by the largest tensor even for the ``medium`` preset.

Tensor types follow llama.cpp's converter: 1-D tensors, norms, routers (``ffn_gate_inp``) and
biases are F32; every other weight is in the requested dtype. ``q8_0`` / ``q4_k`` are built
as F16 next to the target and quantized by llama.cpp itself (``quantize.py``).
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

ARCHS: tuple[str, ...] = ("qwen3moe", "qwen2moe", "mixtral", "gpt-oss")
PRESETS: tuple[str, ...] = ("tiny", "medium")
DTYPES: tuple[str, ...] = ("f32", "f16", "q8_0", "q4_k")

EMBED_STD = 1.0
BIAS_STD = 0.02
# Sharpens attention (Q/K matrices, or qwen3moe's q/k norms, scaled by this): with uniform
# attention the next token depends on the current one only and greedy decoding falls into
# 2-3 token loops on the deeper presets; with it, 64 greedy tokens hold ~50-60 distinct ones.
QK_GAIN = 3.0
_QUANTIZED = {"q8_0", "q4_k"}

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Shape:
    """Hyper-parameters of one test model."""

    n_layer: int
    n_expert: int
    n_used: int
    n_embd: int
    n_ff_exp: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff_shexp: int = 0  # qwen2moe's shared expert
    n_ctx_train: int = 4096
    n_swa: int = 128  # gpt-oss sliding window


# f32/f16 shapes: n_ff_exp is deliberately not a power of two, so an expert's slice of a
# merged tensor (n_embd * n_ff_exp * itemsize bytes) is not a multiple of 4096.
_TINY: dict[str, Shape] = {
    "qwen3moe": Shape(n_layer=4, n_expert=16, n_used=4, n_embd=128, n_ff_exp=68, n_head=4, n_head_kv=2, head_dim=32),
    "qwen2moe": Shape(n_layer=3, n_expert=12, n_used=3, n_embd=128, n_ff_exp=72, n_head=4, n_head_kv=2, head_dim=32,
                      n_ff_shexp=160),
    "mixtral": Shape(n_layer=2, n_expert=8, n_used=2, n_embd=128, n_ff_exp=100, n_head=4, n_head_kv=2, head_dim=32),
    "gpt-oss": Shape(n_layer=2, n_expert=16, n_used=4, n_embd=128, n_ff_exp=72, n_head=4, n_head_kv=2, head_dim=32,
                     n_swa=32),
}

_MEDIUM = Shape(n_layer=8, n_expert=64, n_used=8, n_embd=1024, n_ff_exp=512, n_head=16, n_head_kv=4, head_dim=64)


def preset_shape(arch: str, preset: str, dtype: str) -> Shape:
    """The shape ``build_test_model`` uses for (arch, preset, dtype)."""
    _check_choice("arch", arch, ARCHS)
    _check_choice("preset", preset, PRESETS)
    _check_choice("dtype", dtype, DTYPES)
    if preset == "medium":
        return replace(_MEDIUM, n_ff_shexp=1024 if arch == "qwen2moe" else 0)
    shape = _TINY[arch]
    if dtype == "q8_0":  # Q8_0 rows are blocks of 32 values
        return replace(shape, n_ff_exp=_round_up(shape.n_ff_exp, 32), n_ff_shexp=_round_up(shape.n_ff_shexp, 32))
    if dtype == "q4_k":  # K-quant rows are blocks of 256 values
        return replace(shape, n_embd=256, head_dim=64, n_ff_exp=256, n_ff_shexp=256 if shape.n_ff_shexp else 0)
    return shape


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
            from smoe_gguf.quantize import quantize  # loads libllama: only when needed

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
# "w" = random in the model's dtype.
@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order: the ggml shape reversed
    kind: str


def _tensor_plan(arch: str, s: Shape, n_vocab: int) -> list[_Tensor]:
    plan = [_Tensor("token_embd.weight", (n_vocab, s.n_embd), "w")]
    for i in range(s.n_layer):
        plan += _layer_plan(arch, s, f"blk.{i}.")
    plan.append(_Tensor("output_norm.weight", (s.n_embd,), "norm"))
    plan.append(_Tensor("output.weight", (n_vocab, s.n_embd), "w"))
    return plan


def _layer_plan(arch: str, s: Shape, p: str) -> list[_Tensor]:
    q_dim, kv_dim = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    e, ff, d = s.n_expert, s.n_ff_exp, s.n_embd
    t = [
        _Tensor(p + "attn_norm.weight", (d,), "norm"),
        _Tensor(p + "attn_q.weight", (q_dim, d), "w"),
        _Tensor(p + "attn_k.weight", (kv_dim, d), "w"),
        _Tensor(p + "attn_v.weight", (kv_dim, d), "w"),
        _Tensor(p + "attn_output.weight", (d, q_dim), "w"),
    ]
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
    t += [
        _Tensor(p + "ffn_gate_inp.weight", (e, d), "f32"),
        _Tensor(p + "ffn_gate_exps.weight", (e, ff, d), "w"),
        _Tensor(p + "ffn_up_exps.weight", (e, ff, d), "w"),
        _Tensor(p + "ffn_down_exps.weight", (e, d, ff), "w"),
    ]
    if arch == "gpt-oss":
        t += [_Tensor(p + "ffn_gate_exps.bias", (e, ff), "f32"),
              _Tensor(p + "ffn_up_exps.bias", (e, ff), "f32"),
              _Tensor(p + "ffn_down_exps.bias", (e, d), "f32")]
    if arch == "qwen2moe":
        sh = s.n_ff_shexp
        t += [_Tensor(p + "ffn_gate_inp_shexp.weight", (d,), "f32"),
              _Tensor(p + "ffn_gate_shexp.weight", (sh, d), "w"),
              _Tensor(p + "ffn_up_shexp.weight", (sh, d), "w"),
              _Tensor(p + "ffn_down_shexp.weight", (d, sh), "w")]
    return t


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
    if t.name.endswith(".bias") or "attn_sinks" in t.name:
        return BIAS_STD
    gain = QK_GAIN if t.name.endswith(("attn_q.weight", "attn_k.weight")) else 1.0
    return gain / float(np.sqrt(t.shape[-1]))


def _tensor_data(t: _Tensor, dtype: str, seed: int) -> np.ndarray:
    if t.kind == "norm":
        qk_norm = t.name.endswith(("attn_q_norm.weight", "attn_k_norm.weight"))
        return np.full(t.shape, QK_GAIN if qk_norm else 1.0, dtype=np.float32)
    digest = hashlib.sha256(t.name.encode()).digest()
    rng = np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])
    data = rng.standard_normal(t.shape, dtype=np.float32)
    data *= np.float32(_std(t))
    return data.astype(_np_dtype(t.kind, dtype), copy=False)


# --- metadata ------------------------------------------------------------------------------


def _gguf_arch(arch: str) -> str:
    return "llama" if arch == "mixtral" else arch


def _add_hparams(w: gguf.GGUFWriter, arch: str, s: Shape) -> None:
    a = _gguf_arch(arch)
    w.add_uint32(f"{a}.context_length", s.n_ctx_train)
    w.add_uint32(f"{a}.embedding_length", s.n_embd)
    w.add_uint32(f"{a}.block_count", s.n_layer)
    w.add_uint32(f"{a}.feed_forward_length", s.n_ff_exp)
    w.add_uint32(f"{a}.attention.head_count", s.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", s.n_head_kv)
    w.add_uint32(f"{a}.attention.key_length", s.head_dim)
    w.add_uint32(f"{a}.attention.value_length", s.head_dim)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32(f"{a}.rope.dimension_count", s.head_dim)
    w.add_float32(f"{a}.rope.freq_base", 10000.0)
    w.add_uint32(f"{a}.expert_count", s.n_expert)
    w.add_uint32(f"{a}.expert_used_count", s.n_used)
    if arch != "mixtral":
        w.add_uint32(f"{a}.expert_feed_forward_length", s.n_ff_exp)
    if arch == "qwen2moe":
        w.add_uint32(f"{a}.expert_shared_feed_forward_length", s.n_ff_shexp)
    if arch == "gpt-oss":
        w.add_uint32(f"{a}.attention.sliding_window", s.n_swa)


def _write_gguf(path: Path, arch: str, preset: str, s: Shape, dtype: str, seed: int,
                progress: Progress | None) -> None:
    tokens, types, merges, special = _vocab()
    plan = _tensor_plan(arch, s, len(tokens))
    w = gguf.GGUFWriter(path, _gguf_arch(arch))
    try:
        w.add_name(f"smoe-test {arch} {preset} seed {seed}")
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        _add_hparams(w, arch, s)
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


def _bytes_to_unicode() -> dict[int, str]:
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
    b2u = _bytes_to_unicode()
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
        tokens = [_bytes_to_unicode()[b] for b in range(256)]
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
