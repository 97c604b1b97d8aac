"""Stock llama.cpp reference runner: greedy decoding with unmodified llama.cpp.

Tests and the bench compare smoe-gguf against this. ``run_greedy`` takes already-built
model/context params, so a caller can run the very same loop with its own
``tensor_buft_overrides`` / ``cb_eval`` (it must keep whatever those params point to alive for
the call).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np

from smoe_gguf.errors import SmoeError
from smoe_gguf.llama_session import (
    LOG,
    Sampler,
    Sampling,
    context_params,
    decode,
    free_context,
    last_logits,
    load_model,
    model_params,
    new_context,
    sample_tokens,
    tokenize_with,
)

__all__ = ["LOG", "GreedyRun", "context_params", "free_context", "greedy", "greedy_loop", "load_model",
           "model_params", "new_context", "run_greedy", "tokenize", "tokenize_with"]


@dataclass
class GreedyRun:
    """``logits[i]`` (float32 copy, last position) is the distribution ``tokens[i]`` was taken from."""

    tokens: list[int]
    logits: list[np.ndarray] = field(repr=False)


def tokenize(model_path: str | Path, text: str) -> list[int]:
    """Tokenize ``text`` with the vocabulary of the model file (loads the vocab only)."""
    params = model_params()
    params.vocab_only = True
    model = load_model(model_path, params)
    try:
        return tokenize_with(llama_cpp.llama_model_get_vocab(model), text)
    finally:
        llama_cpp.llama_model_free(model)


def greedy_loop(ctx: llama_cpp.llama_context_p, n_vocab: int, prompt_tokens: list[int],
                n_tokens: int, n_batch: int, sampling: Sampling | None = None) -> GreedyRun:
    """Decode the prompt in chunks of ``n_batch``, then take ``n_tokens`` tokens (argmax unless
    ``sampling`` says otherwise). End-of-generation tokens do not stop the loop."""
    if not prompt_tokens:
        raise SmoeError("the prompt is empty")
    for start in range(0, len(prompt_tokens), n_batch):
        decode(ctx, prompt_tokens[start:start + n_batch])
    run = GreedyRun(tokens=[], logits=[])
    sampler = Sampler(ctx, sampling or Sampling())
    try:
        for token, logits in sample_tokens(lambda t: decode(ctx, t), lambda: last_logits(ctx, n_vocab),
                                           sampler, n_tokens):
            run.tokens.append(token)
            run.logits.append(logits)
    finally:
        sampler.free()
    return run


def run_greedy(model_path: str | Path, prompt: str | list[int], n_tokens: int,
               mparams: llama_cpp.llama_model_params, cparams: llama_cpp.llama_context_params) -> GreedyRun:
    """Load, greedy-decode, free. The caller owns the params and what they point to."""
    model = load_model(model_path, mparams)
    ctx = None
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        tokens = tokenize_with(vocab, prompt) if isinstance(prompt, str) else list(prompt)
        if len(tokens) + n_tokens > cparams.n_ctx:
            raise SmoeError(f"prompt ({len(tokens)} tokens) + {n_tokens} new tokens do not fit n_ctx={cparams.n_ctx}")
        ctx = new_context(model, cparams)
        return greedy_loop(ctx, llama_cpp.llama_vocab_n_tokens(vocab), tokens, n_tokens, cparams.n_batch)
    finally:
        if ctx is not None:
            free_context(ctx)
        llama_cpp.llama_model_free(model)


def greedy(model_path: str | Path, prompt: str | list[int], n_tokens: int = 32, n_ctx: int = 512,
           n_threads: int = 2, n_batch: int = 512, n_ubatch: int = 512, plain_experts: bool = False,
           n_gpu_layers: int = 0) -> GreedyRun:
    """Greedy-decode ``n_tokens`` tokens with unmodified llama.cpp (see model_params): on the CPU,
    or with ``n_gpu_layers`` layers on a GPU where the build has one; its experts on the CPU with
    ``plain_experts``, never copied to a GPU for a prompt's matmuls (llama.cpp's
    ``--no-op-offload``, as the engine runs)."""
    cparams = context_params(n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch, n_ubatch=n_ubatch)
    cparams.op_offload = False
    return run_greedy(model_path, prompt, n_tokens, model_params(n_gpu_layers, plain_experts=plain_experts), cparams)
