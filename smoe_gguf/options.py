"""Checks of command-line values before a model is loaded: each bad value is refused with one
line (exit status 2, as for any other usage error) before llama.cpp could abort on it or a
file could be overwritten."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import psutil

from . import archs
from .console import human
from .errors import SmoeError
from .gguf_layout import INT_TYPES, GGUFLayout, read_layout
from .moe import analyze
from .pack import manifest as mf
from .safeio import refuse_input
from .template import clean_text

MAX_CTX = (1 << 31) - 1  # llama.cpp's n_ctx is a uint32; its positions are int32
CTX_TRAIN_FACTOR = 16  # the most a context may exceed what the model was trained for (rope scaling)
CHECKSUMS_NEVER_WARNING = ("--checksums never: leaf bytes are not checked; a damaged or altered pack "
                           "then gives wrong output without any error")

Warn = Callable[[str], None]


def usage(message: str) -> SmoeError:
    return SmoeError(message, exit_code=2)


def check_threads(threads: int | None) -> None:
    cpus = os.cpu_count() or 1
    if threads is not None and not 1 <= threads <= cpus:
        raise usage(f"--threads must be between 1 and {cpus} (this machine's CPUs), not {threads}")


def check_temp(temp: float) -> None:
    if not math.isfinite(temp) or temp < 0:
        raise usage(f"--temp must be a finite number, 0 or more (0 = greedy), not {temp}")


def check_n_tokens(n: int, option: str = "--n-tokens") -> None:
    if n < 1:
        raise usage(f"{option} must be at least 1")


def check_checksums(mode: str, warn: Warn) -> None:
    if mode not in ("first", "always", "never"):
        raise usage(f"--checksums must be first, always or never, not {mode!r}")
    if mode == "never":
        warn(CHECKSUMS_NEVER_WARNING)


def check_outputs(model: Path, **outputs: Path | None) -> None:
    """Refuse output files (``trace=PATH``, ``profile=PATH``) that would replace the model, a file
    of the pack, or each other."""
    given = {name: path for name, path in outputs.items() if path is not None}
    for name, path in given.items():
        refuse_input(path, [model], f"--{name}")
    paths = list(given.items())
    for i, (a, pa) in enumerate(paths):
        for b, pb in paths[i + 1:]:
            if os.path.realpath(pa) == os.path.realpath(pb):
                raise usage(f"--{a} and --{b} name the same file {pa}")


def _header(model: Path) -> GGUFLayout:
    """The model's GGUF header: a plain GGUF's, or a pack's core's (checked again at load)."""
    if model.is_dir():
        if not (model / mf.CORE_FILE).is_file():
            mf.load(model)  # says what is wrong with this directory
            raise SmoeError(f"{model / mf.CORE_FILE}: missing")
        return read_layout(model / mf.CORE_FILE)
    layout = read_layout(model)
    analyze(layout)  # a clear message for MoE keys llama.cpp would abort on
    return layout


def kv_bytes_per_token(layout: GGUFLayout) -> int | None:
    """The KV cache's bytes per token of context (F16 K and V in every layer), from the header;
    None where the header does not say enough."""
    arch = layout.architecture

    def num(what: str) -> int | None:
        kv = layout.kvs.get(archs.meta_key(arch, what))
        if kv is None:
            return None
        vals = kv.value if isinstance(kv.value, list) else [kv.value]
        if not vals or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vals):
            return None
        return max(vals)

    n_layer, n_embd, n_head = num("block_count"), num("embedding_length"), num("attention.head_count")
    if not n_layer or not n_embd or not n_head:
        return None
    n_head_kv = num("attention.head_count_kv") or n_head
    k_len = num("attention.key_length") or n_embd // n_head
    v_len = num("attention.value_length") or n_embd // n_head
    return n_layer * n_head_kv * (k_len + v_len) * 2


def check_ctx(model: Path, ctx: int) -> None:
    """Refuse a context llama.cpp could not hold: below 1, far beyond what the model was trained
    for, or a KV cache larger than the memory available (llama.cpp would try to allocate it)."""
    if not 1 <= ctx <= MAX_CTX:
        raise usage(f"--ctx must be between 1 and {MAX_CTX}, not {ctx}")
    layout = _header(model)
    kv = layout.kvs.get(archs.meta_key(layout.architecture, "context_length"))
    n_train = int(kv.value) if kv is not None and kv.vtype in INT_TYPES else 0
    if n_train > 0 and ctx > max(CTX_TRAIN_FACTOR * n_train, 2048):
        raise usage(f"--ctx {ctx} is far beyond the {n_train} tokens this model was trained for "
                    f"(at most {max(CTX_TRAIN_FACTOR * n_train, 2048)})")
    per_token = kv_bytes_per_token(layout)
    avail = psutil.virtual_memory().available
    if per_token is not None and per_token * ctx > avail:
        raise usage(f"--ctx {ctx} needs about {human(per_token * ctx)} of KV cache, more than the "
                    f"{human(avail)} of memory available")


def check_run(model: Path, *, ctx: int, threads: int | None, temp: float, checksums: str, warn: Warn,
              trace: Path | None = None, profile: Path | None = None) -> None:
    """Every check of a command that runs a model (run, chat), before it is loaded."""
    check_threads(threads)
    check_temp(temp)
    check_checksums(checksums, warn)
    check_outputs(model, trace=trace, profile=profile)
    check_ctx(model, ctx)


def prompt_text(text: str) -> str:
    """Command-line text as llama.cpp takes it: bytes that are not UTF-8 become U+FFFD."""
    return clean_text(text)
