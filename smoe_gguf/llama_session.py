"""The llama.cpp session glue: params, loading, tokenizing, decoding and logits.

Every caller of llama-cpp-python's low-level API (the engine, the stock reference runner, the
bench) goes through these functions. llama.cpp's log output is swallowed by default (set ``SMOE_LLAMA_LOG=1`` to see it on stderr);
its last error lines are kept and put into the SmoeError raised on failure.
"""

from __future__ import annotations

import _signal
import ctypes
import functools
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


_PLAIN_EXPERTS: list[object] = []  # keeps the override array of plain_experts alive


def _plain_expert_overrides() -> int:
    """``-ot exps=CPU``, unrepacked: every routed-expert tensor in llama.cpp's CPU buffer, in the
    plain layout (:func:`ggml_abi.plain_cpu_buffer_type`)."""
    if not _PLAIN_EXPERTS:
        from smoe_gguf import archs
        from smoe_gguf import ggml_abi as abi

        pattern = archs.EXPERT_TENSOR_PATTERN.encode()
        arr = (abi.LlamaTensorBuftOverride * 2)()
        arr[0].pattern = pattern
        abi.ensure_layout()
        arr[0].buft = abi.plain_cpu_buffer_type()
        _PLAIN_EXPERTS.extend([pattern, arr])
    return ctypes.addressof(_PLAIN_EXPERTS[1])  # type: ignore[arg-type]


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX (read from /proc/cpuinfo; False elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split()
    except OSError:
        pass
    return False


def model_params(n_gpu_layers: int = 0, plain_experts: bool = False) -> llama_cpp.llama_model_params:
    """Default model params, CPU only unless told otherwise.

    ``plain_experts``: keep the routed experts in the plain CPU buffer type, as llama.cpp's
    ``-ot exps=CPU`` does, instead of letting the CPU backend repack them (on x86 it repacks
    Q4_0/Q4_K/Q8_0/IQ4_NL... into interleaved layouts with their own kernels, which sum in
    another order). This is the stock configuration the X-Slot is bit-exact against: the X-Slot
    holds leaves in file layout, as the plain CPU buffer does. The dense core is repacked either way,
    except on CPUs with AMX: llama.cpp's AMX buffer type crashes in graphs the gate computes in
    pieces (a segfault in ggml_backend_amx_mul_mat), so there every caller (engine, stock reference,
    bench) runs without the CPU backend's extra buffer types.
    """
    p = llama_cpp.llama_model_default_params()
    p.n_gpu_layers = n_gpu_layers
    if cpu_has_amx():
        p.use_extra_bufts = False
    if plain_experts:
        p.tensor_buft_overrides = _plain_expert_overrides()
    return p


def context_params(n_ctx: int = 512, n_threads: int = 2, n_batch: int = 512,
                   n_ubatch: int = 512, n_threads_batch: int | None = None) -> llama_cpp.llama_context_params:
    """``n_threads`` compute one-token batches (decode), ``n_threads_batch`` (default: the same)
    the others (prompt micro-batches)."""
    p = llama_cpp.llama_context_default_params()
    p.n_ctx = n_ctx
    p.n_batch = n_batch
    p.n_ubatch = n_ubatch
    p.n_threads = n_threads
    p.n_threads_batch = n_threads_batch or n_threads
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
    """Create a context with its compute thread pools (:func:`_attach_threadpools`) or raise
    SmoeError. Free with :func:`free_context`."""
    LOG.clear()
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise SmoeError(f"llama.cpp could not create a context: {LOG.reason() or 'unknown error'}")
    try:
        _attach_threadpools(ctx, params.n_threads, params.n_threads_batch)
    except BaseException:
        free_context(ctx)
        raise
    return ctx


def free_context(ctx: llama_cpp.llama_context_p) -> None:
    """Free a context from :func:`new_context`, then its thread pools."""
    llama_cpp.llama_free(ctx)
    from . import ggml_abi as abi

    for pool in _POOLS.pop(_address(ctx), []):
        abi.ggml_threadpool_free(pool)


_POOLS: dict[int, list[int]] = {}  # a context's address: its thread pools


def _address(ctx: llama_cpp.llama_context_p) -> int:
    return ctx if isinstance(ctx, int) else int(ctypes.cast(ctx, ctypes.c_void_p).value or 0)


def _attach_threadpools(ctx: llama_cpp.llama_context_p, n_threads: int, n_threads_batch: int) -> None:
    """Give ``ctx`` persistent compute thread pools, one for one-token batches (decode) and one
    for prompt micro-batches (one pool where their sizes match), as llama.cpp's own tools do,
    with ggml's default polling. Without them, a llama.cpp built without OpenMP (Apple's
    compiler) starts and joins a pool of threads for every graph computation, and the gate
    splits a paged token's graph into pieces at every layer. With OpenMP the pools hold only
    per-thread state."""
    from . import ggml_abi as abi

    abi.ensure_layout()
    pools = _POOLS.setdefault(_address(ctx), [])

    def pool(n: int, paused: bool) -> int:
        p = abi.GgmlThreadpoolParams()
        abi.ggml_threadpool_params_init(ctypes.byref(p), n)
        p.paused = paused  # resumed by its first graph
        tp = abi.ggml_threadpool_new(ctypes.byref(p))
        if not tp:
            raise SmoeError(f"ggml could not start a pool of {n} compute threads")
        pools.append(tp)
        return int(tp)

    batch = pool(n_threads_batch, False)
    decode = batch if n_threads == n_threads_batch else pool(n_threads, True)
    abi.llama_attach_threadpool(ctx, decode, batch)


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


_DEFERRED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and the termination signals while llama.cpp computes, and deliver them when it
    returns. llama.cpp calls back into Python (the gate's misses and observers) and ctypes
    drops any exception raised there by a signal handler: the signal would be lost, and a callback
    cut short. In threads other than the main one (which receives signals) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def defer(signum: int, _frame: object) -> None:
        caught.append(signum)

    # _signal's functions: signal's own add enum conversions to every call (nine per decode call),
    # for the same handlers
    old = {sig: _signal.signal(sig, defer)
           for sig in _DEFERRED if _signal.getsignal(sig) is not None}  # None: set outside Python, left alone
    try:
        yield
    finally:
        for sig, handler in old.items():
            _signal.signal(sig, handler)
        for signum in caught[:1]:  # the first one decides, as it would have undeferred
            signal.raise_signal(signum)


def decode(ctx: llama_cpp.llama_context_p, tokens: list[int]) -> None:
    """Append ``tokens`` (one batch) to the context; raise SmoeError with llama.cpp's reason."""
    arr = (llama_cpp.llama_token * len(tokens))(*tokens)  # referenced until decode returns
    LOG.clear()
    rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(tokens)))
    if rc != 0:
        raise SmoeError(f"llama_decode failed (code {rc}): {LOG.reason() or 'no reason given'}")


def last_logits(ctx: llama_cpp.llama_context_p, n_vocab: int) -> np.ndarray:
    """A float32 copy of the logits of the last token decoded."""
    ptr = llama_cpp.llama_get_logits_ith(ctx, -1)
    if not ptr:
        raise SmoeError("llama.cpp returned no logits")
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()


def token_piece(vocab: llama_cpp.llama_vocab_p, token: int) -> bytes:
    """The bytes of one token (special tokens rendered)."""
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    return buf.raw[: max(n, 0)]


@dataclass(frozen=True)
class Sampling:
    """How a token is picked from the logits: argmax at ``temp`` 0, else llama.cpp's top-p
    (when ``top_p`` < 1), temperature and seeded draw."""

    temp: float = 0.0
    seed: int = 0
    top_p: float = 1.0


class Sampler:
    """A :class:`Sampling` over one context (argmax is bit-comparable with stock greedy)."""

    def __init__(self, ctx: llama_cpp.llama_context_p, sampling: Sampling) -> None:
        self.ctx = ctx
        self.chain = None
        if sampling.temp > 0:
            sp = llama_cpp.llama_sampler_chain_default_params()
            self.chain = llama_cpp.llama_sampler_chain_init(sp)
            if sampling.top_p < 1.0:
                llama_cpp.llama_sampler_chain_add(self.chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
            llama_cpp.llama_sampler_chain_add(self.chain, llama_cpp.llama_sampler_init_temp(sampling.temp))
            llama_cpp.llama_sampler_chain_add(self.chain, llama_cpp.llama_sampler_init_dist(sampling.seed & 0xFFFFFFFF))

    def pick(self, logits: np.ndarray | None) -> int:
        """The next token: argmax of ``logits``, or the chain's pick from the context's last
        logits (``logits`` unused, may be None)."""
        if self.chain is None:
            if logits is None:
                raise SmoeError("greedy sampling needs the logits")
            return int(np.argmax(logits))
        return int(llama_cpp.llama_sampler_sample(self.chain, self.ctx, -1))

    def free(self) -> None:
        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None


def sample_tokens(decode_one: Callable[[list[int]], None], logits: Callable[[], np.ndarray], sampler: Sampler,
                  n_tokens: int, want_logits: bool = True) -> Iterator[tuple[int, np.ndarray | None]]:
    """The decode loop, once the prompt is in: yield (token, the logits it was picked from) up to
    ``n_tokens`` times, decoding each token before the next is picked. The last token yielded
    is not decoded; neither is one after which the caller stops asking. Without ``want_logits``
    a sampler chain picks from llama.cpp's own logits, not copied out (None is yielded)."""
    for i in range(n_tokens):
        lg = logits() if want_logits or sampler.chain is None else None
        tok = sampler.pick(lg)
        yield tok, lg
        if i + 1 < n_tokens:
            decode_one([tok])
