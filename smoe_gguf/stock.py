"""Stock llama.cpp reference runner: greedy decoding through llama-cpp-python's low-level API.

Tests compare smoe-gguf against this. ``run_greedy`` takes already-built model/context params,
so a caller can run the very same loop with its own ``tensor_buft_overrides`` / ``cb_eval``
(it must keep whatever those params point to alive for the call).

llama.cpp's log output is swallowed by default (set ``SMOE_LLAMA_LOG=1`` to see it on stderr);
its last error lines are kept and put into the SmoeError raised on failure.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np

from smoe_gguf.errors import SmoeError

_LEVEL_ERROR = 4  # GGML_LOG_LEVEL_ERROR
_LEVEL_CONT = 5  # GGML_LOG_LEVEL_CONT: continues the previous message


class LlamaLog:
    """A log callback for llama.cpp/ggml that drops everything but remembers recent errors."""

    def __init__(self) -> None:
        self._errors: deque[str] = deque(maxlen=8)
        self._last_level = 0
        self.echo = bool(os.environ.get("SMOE_LLAMA_LOG"))
        # Keep the ctypes callback referenced for the life of the process: llama.cpp calls it.
        self._callback = llama_cpp.llama_log_callback(self._on_log)
        self._backend_ready = False

    def install(self) -> None:
        """(Re)install the callback; cheap, safe to call before every llama.cpp call."""
        if not self._backend_ready:
            llama_cpp.llama_backend_init()
            self._backend_ready = True
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def clear(self) -> None:
        self._errors.clear()

    def reason(self) -> str:
        """The recent error lines joined into one line ("" if none)."""
        return " ".join(" ".join(self._errors).split())

    def _on_log(self, level: int, text: bytes | None, _user_data: int | None) -> None:
        try:
            msg = (text or b"").decode("utf-8", "replace")
            if self.echo:
                sys.stderr.write(msg)
            if level == _LEVEL_CONT:
                level = self._last_level
            self._last_level = level
            if level == _LEVEL_ERROR and msg.strip():
                self._errors.append(msg.strip())
        except Exception:  # noqa: BLE001 - an exception must never cross into C
            pass


LOG = LlamaLog()


@dataclass
class GreedyRun:
    """``logits[i]`` (float32 copy, last position) is the distribution ``tokens[i]`` was taken from."""

    tokens: list[int]
    logits: list[np.ndarray] = field(repr=False)


_PLAIN_EXPERTS: list[object] = []  # keeps the override array of plain_experts alive


def _plain_expert_overrides() -> int:
    """``-ot exps=CPU``: every routed-expert tensor in llama.cpp's plain CPU buffer type."""
    if not _PLAIN_EXPERTS:
        from smoe_gguf import archs
        from smoe_gguf import ggml_abi as abi

        pattern = archs.EXPERT_TENSOR_PATTERN.encode()
        arr = (abi.LlamaTensorBuftOverride * 2)()
        arr[0].pattern = pattern
        arr[0].buft = abi.ggml_backend_cpu_buffer_type()
        _PLAIN_EXPERTS.extend([pattern, arr])
    return ctypes.addressof(_PLAIN_EXPERTS[1])  # type: ignore[arg-type]


def model_params(n_gpu_layers: int = 0, plain_experts: bool = False) -> llama_cpp.llama_model_params:
    """Default model params, CPU only unless told otherwise.

    ``plain_experts``: keep the routed experts in the plain CPU buffer type, as llama.cpp's
    ``-ot exps=CPU`` does, instead of letting the CPU backend repack them (on x86 it repacks
    Q4_0/Q4_K/Q8_0/IQ4_NL... into interleaved layouts with their own kernels, which sum in
    another order). This is the stock configuration the X-Slot is bit-exact against: the X-Slot
    holds leaves in file layout, as the plain CPU buffer does. The dense core is repacked either way.
    """
    p = llama_cpp.llama_model_default_params()
    p.n_gpu_layers = n_gpu_layers
    if plain_experts:
        p.tensor_buft_overrides = _plain_expert_overrides()
    return p


def context_params(n_ctx: int = 512, n_threads: int = 2, n_batch: int = 512,
                   n_ubatch: int = 512) -> llama_cpp.llama_context_params:
    p = llama_cpp.llama_context_default_params()
    p.n_ctx = n_ctx
    p.n_batch = n_batch
    p.n_ubatch = n_ubatch
    p.n_threads = n_threads
    p.n_threads_batch = n_threads
    p.no_perf = True
    return p


def load_model(model_path: str | Path, params: llama_cpp.llama_model_params) -> llama_cpp.llama_model_p:
    """Load a model or raise SmoeError with llama.cpp's reason. Free with llama_model_free."""
    path = Path(model_path)
    if not path.is_file():
        raise SmoeError(f"cannot load {path}: no such file")
    LOG.install()
    LOG.clear()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise SmoeError(f"llama.cpp could not load {path}: {LOG.reason() or 'unknown error'}")
    return model


def new_context(model: llama_cpp.llama_model_p,
                params: llama_cpp.llama_context_params) -> llama_cpp.llama_context_p:
    """Create a context or raise SmoeError. Free with llama_free."""
    LOG.clear()
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise SmoeError(f"llama.cpp could not create a context: {LOG.reason() or 'unknown error'}")
    return ctx


def tokenize_with(vocab: llama_cpp.llama_vocab_p, text: str) -> list[int]:
    """Tokenize with special tokens parsed and the model's BOS/EOS policy applied."""
    data = text.encode("utf-8")
    n_max = len(data) + 16
    buf = (llama_cpp.llama_token * n_max)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, True, True)
    if n < 0:
        n_max = -n
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, True, True)
    if n < 0:
        raise SmoeError(f"llama.cpp could not tokenize the text (code {n})")
    return list(buf[:n])


def tokenize(model_path: str | Path, text: str) -> list[int]:
    """Tokenize ``text`` with the vocabulary of the model file (loads the vocab only)."""
    params = model_params()
    params.vocab_only = True
    model = load_model(model_path, params)
    try:
        return tokenize_with(llama_cpp.llama_model_get_vocab(model), text)
    finally:
        llama_cpp.llama_model_free(model)


def _decode(ctx: llama_cpp.llama_context_p, tokens: list[int]) -> None:
    arr = (llama_cpp.llama_token * len(tokens))(*tokens)  # referenced until decode returns
    LOG.clear()
    rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(tokens)))
    if rc != 0:
        raise SmoeError(f"llama_decode failed (code {rc}): {LOG.reason() or 'no reason given'}")


def _last_logits(ctx: llama_cpp.llama_context_p, n_vocab: int) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(ctx, -1)
    if not ptr:
        raise SmoeError("llama.cpp returned no logits")
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()


def greedy_loop(ctx: llama_cpp.llama_context_p, n_vocab: int, prompt_tokens: list[int],
                n_tokens: int, n_batch: int) -> GreedyRun:
    """Decode the prompt in chunks of ``n_batch``, then take ``n_tokens`` argmax tokens.

    End-of-generation tokens do not stop the loop: exactly ``n_tokens`` come back.
    """
    if not prompt_tokens:
        raise SmoeError("the prompt is empty")
    for start in range(0, len(prompt_tokens), n_batch):
        _decode(ctx, prompt_tokens[start:start + n_batch])
    run = GreedyRun(tokens=[], logits=[])
    for i in range(n_tokens):
        logits = _last_logits(ctx, n_vocab)
        token = int(np.argmax(logits))
        run.tokens.append(token)
        run.logits.append(logits)
        if i + 1 < n_tokens:
            _decode(ctx, [token])
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
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def greedy(model_path: str | Path, prompt: str | list[int], n_tokens: int = 32, n_ctx: int = 512,
           n_threads: int = 2, n_batch: int = 512, n_ubatch: int = 512, plain_experts: bool = False) -> GreedyRun:
    """Greedy-decode ``n_tokens`` tokens with unmodified llama.cpp on the CPU (see model_params)."""
    return run_greedy(model_path, prompt, n_tokens, model_params(plain_experts=plain_experts),
                      context_params(n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch, n_ubatch=n_ubatch))
