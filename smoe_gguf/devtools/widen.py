"""Widen a MoE GGUF's experts with zero neurons: leaves ``factor`` times larger, same outputs.

Each expert's feed-forward width ``n_ff`` becomes ``factor * n_ff``: the gate and up matrices
get ``(factor - 1) * n_ff`` rows of zeros and the down matrix as many columns of zeros. A zero
neuron computes ``silu(0 . x) * (0 . x) = 0`` and its down column multiplies that 0, so it adds
exactly nothing; routing, attention and the rest of the model are copied byte for byte. The
result is a model whose leaves have the size of a large model's while its routing and its
outputs are those of the (trained) source: :func:`compare_models` measures how close llama.cpp
keeps them (its sums over the wider rows may group their terms differently).

Float expert tensors only (F32, F16, BF16): zero bytes are a zero value there.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from smoe_gguf import archs
from smoe_gguf.devtools import stock
from smoe_gguf.errors import SmoeError
from smoe_gguf.gguf_layout import T_UINT32, align_up, encode_kv, encode_tensor_info, read_layout, write_header
from smoe_gguf.llama_session import Sampling
from smoe_gguf.moe import analyze

_FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16"}
_ROWS, _COLUMNS = "rows", "columns"
_WIDENED = {"gate": _ROWS, "up": _ROWS, "down": _COLUMNS}  # part -> which side n_ff is on
WIDEN_KEY = "smoe.widen.source_n_ff"  # the source's expert width, kept in the widened file


def widen_experts(src: str | os.PathLike[str], dst: str | os.PathLike[str], factor: int) -> Path:
    """Write ``dst``: ``src`` with every routed expert ``factor`` times wider (zero neurons).
    Written under a temporary name in ``dst``'s directory, then renamed. Returns ``dst``."""
    if factor < 1:
        raise SmoeError(f"widening factor must be at least 1, not {factor}")
    layout = read_layout(src)
    model = analyze(layout).require_moe()
    arch = model.arch
    ff_key = archs.meta_key(arch, "expert_feed_forward_length")
    if ff_key not in layout.kvs:
        raise SmoeError(f"{layout.path}: no {ff_key}: widening supports architectures with their own expert width")
    n_ff = int(layout.kvs[ff_key].value)
    parts = {t.info.name: t for ts in model.expert_tensors.values() for t in ts}
    for name, t in parts.items():
        if t.part not in _WIDENED:
            raise SmoeError(f"{name}: widening supports gate, up and down expert matrices only, not {t.part}")
        if t.info.ggml_type not in _FLOAT_TYPES:
            raise SmoeError(f"{name}: widening supports F32, F16 and BF16 experts only (type {t.info.ggml_type})")
        side = 1 if _WIDENED[t.part] == _ROWS else 0
        if t.info.shape[side] != n_ff:
            raise SmoeError(f"{name}: shape {list(t.info.shape)} has no expert width {n_ff} where expected")

    def new_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        t = parts.get(name)
        if t is None:
            return shape
        side = 1 if _WIDENED[t.part] == _ROWS else 0
        return tuple(d * factor if i == side else d for i, d in enumerate(shape))

    kvs = [encode_kv(ff_key, T_UINT32, n_ff * factor) if k == ff_key else kv.raw
           for k, kv in layout.kvs.items() if k != WIDEN_KEY]
    kvs.append(encode_kv(WIDEN_KEY, T_UINT32, int(layout.kvs[WIDEN_KEY].value) if WIDEN_KEY in layout.kvs else n_ff))
    infos: list[bytes] = []
    rels: list[int] = []
    rel = 0
    for t in layout.tensors:
        shape = new_shape(t.name, t.shape)
        nbytes = t.nbytes * factor if t.name in parts else t.nbytes
        infos.append(encode_tensor_info(t.name, t.ggml_type, shape, rel))
        rels.append(rel)
        rel = align_up(rel + nbytes, layout.alignment)

    out = Path(dst)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f, open(layout.path, "rb") as fin:
            data = write_header(f, layout.version, kvs, infos, layout.alignment)
            for t, rel in zip(layout.tensors, rels):
                f.write(b"\0" * (data + rel - f.tell()))
                fin.seek(t.offset)
                p = parts.get(t.name)
                if p is None:
                    _copy(fin, f, t.nbytes)
                    continue
                slice_bytes = t.nbytes // model.n_expert
                for _e in range(model.n_expert):
                    raw = np.frombuffer(fin.read(slice_bytes), np.uint8)
                    if _WIDENED[p.part] == _ROWS:  # n_ff rows of n_embd: zero rows after them
                        f.write(raw.tobytes())
                        f.write(bytes(slice_bytes * (factor - 1)))
                    else:  # n_embd rows of n_ff: each row continues with zeros
                        rows = raw.reshape(t.shape[1], -1)
                        wide = np.zeros((rows.shape[0], rows.shape[1] * factor), np.uint8)
                        wide[:, : rows.shape[1]] = rows
                        f.write(wide.tobytes())
            f.write(b"\0" * (align_up(f.tell(), layout.alignment) - f.tell()))
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _copy(fin: object, fout: object, n: int, chunk: int = 16 << 20) -> None:
    while n > 0:
        b = fin.read(min(chunk, n))  # type: ignore[attr-defined]
        if not b:
            raise SmoeError("source GGUF is truncated")
        fout.write(b)  # type: ignore[attr-defined]
        n -= len(b)


@dataclass
class Comparison:
    """Two models run by stock llama.cpp on the same prompts: tokens and logits side by side."""

    prompts: int
    tokens_per_prompt: int
    same_greedy_tokens: bool
    same_sampled_tokens: bool
    max_abs_logit_diff: float  # over every position compared (greedy run, then sampled run)
    logit_std: float  # of the first model's logits, for scale
    positions: int

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def compare_models(a: str | os.PathLike[str], b: str | os.PathLike[str], prompts: Sequence[str], n_tokens: int,
                   temp: float = 0.8, seed: int = 0, n_threads: int = 2, n_ctx: int = 512) -> Comparison:
    """Greedy and seeded sampled decoding of ``prompts`` with both models (stock llama.cpp, experts
    in the plain CPU buffer), and the largest difference between their logits at each step.
    Where the tokens part ways the logits are compared only up to there (each model is fed its own)."""
    samplings = (Sampling(), Sampling(temp=temp, seed=seed))
    ra, rb = _decode_all(a, prompts, n_tokens, samplings, n_threads, n_ctx), \
        _decode_all(b, prompts, n_tokens, samplings, n_threads, n_ctx)
    same: list[bool] = []
    diff, std, positions = 0.0, 0.0, 0
    for runs_a, runs_b in zip(ra, rb):
        same.append(all(x.tokens == y.tokens for x, y in zip(runs_a, runs_b)))
        for x, y in zip(runs_a, runs_b):
            k = next((i for i, (s, t) in enumerate(zip(x.tokens, y.tokens)) if s != t), len(x.tokens))
            k = min(len(x.tokens), k + 1)  # the first differing step's logits were fed the same tokens
            for la, lb in zip(x.logits[:k], y.logits[:k]):
                diff = max(diff, float(np.max(np.abs(la.astype(np.float64) - lb))))
                std = max(std, float(la.std()))
                positions += 1
    return Comparison(len(prompts), n_tokens, same[0], same[1], diff, std, positions)


def _decode_all(path: str | os.PathLike[str], prompts: Sequence[str], n_tokens: int, samplings: Sequence[Sampling],
                n_threads: int, n_ctx: int) -> list[list[stock.GreedyRun]]:
    """For each sampling, each prompt decoded from an empty context of one loaded model."""
    model = stock.load_model(path, stock.model_params(plain_experts=True))
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        out: list[list[stock.GreedyRun]] = []
        for sampling in samplings:
            runs = []
            for prompt in prompts:
                ctx = stock.new_context(model, stock.context_params(n_ctx=n_ctx, n_threads=n_threads))
                try:
                    runs.append(stock.greedy_loop(ctx, n_vocab, stock.tokenize_with(vocab, prompt), n_tokens, 512,
                                                  sampling=sampling))
                finally:
                    stock.free_context(ctx)
            out.append(runs)
        return out
    finally:
        llama_cpp.llama_model_free(model)
