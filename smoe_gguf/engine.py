"""The engine: a llama.cpp session whose routed experts live in the X-Slot, paged by the gate.

Loading a pack: llama.cpp gets the pack's ``core.gguf`` (split 1 of 2) and a sparse *expert stub*
(split 2: the expert tensors' infos, then a hole) written to a temporary directory, so it never
sees a real expert byte. Every routed-expert tensor is sent to the X-Slot by
``tensor_buft_overrides``; the load reads with O_DIRECT (``LLAMA_LOAD_MODE_DIRECT_IO``), so
start-up reads the core from disk and only zeros from the stub's hole (no disk I/O, nothing left
in the page cache). Loading a plain GGUF works the same way but reads (and drops) its expert bytes
once at start-up; leaves are then read from it by offset.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import psutil

from . import stock
from .errors import SmoeError
from . import archs
from .gate import KIND_BEFORE_DOWN, Gate, ObserverSwitch
from .gguf_layout import T_UINT16, T_UINT32, align_up, encode_kv, encode_tensor_info, read_layout, write_header
from .moe import analyze
from .pack import manifest as mf
from .residency import Residency, page_cost, parse_budget
from . import profile as tree_map
from .profile import Profile
from .speculate import DEFAULT_THRESHOLD, Speculator
from .trace import Trace
from .store import LeafStore
from .xslot import XSlot

@dataclass
class Source:
    """What the engine loads: the files llama.cpp opens and where the leaves come from."""

    path: Path
    kind: str  # "pack" or "gguf"
    llama_paths: list[Path]
    store: LeafStore
    core_bytes: int
    expert_bytes: int
    n_expert: int
    n_expert_used: int
    model_id: str  # the source's identity (profiles are keyed by it)
    stub_dir: tempfile.TemporaryDirectory[str] | None = None


def write_expert_stub(path: Path, m: mf.Manifest) -> int:
    """Split 2 of a pack's model: the expert tensors' infos and a hole of their size. Its size."""
    infos, rel = [], 0
    for t in m.tensors:
        if t.where == "leaves":
            infos.append(encode_tensor_info(t.name, t.ggml_type, tuple(t.shape), rel))
            rel = align_up(rel + t.nbytes, m.alignment)
    kvs = [encode_kv("general.alignment", T_UINT32, m.alignment), encode_kv("split.no", T_UINT16, 1)]
    with open(path, "wb") as f:
        data = write_header(f, 3, kvs, infos, m.alignment)
        f.truncate(data + rel)
    return data + rel


def open_source(path: Path, checksums: str = "first") -> Source:
    if path.is_dir():
        m = mf.load(path)
        stub_dir = tempfile.TemporaryDirectory(prefix="smoe-stub-")
        stub = Path(stub_dir.name) / "experts-stub.gguf"
        write_expert_stub(stub, m)
        return Source(
            path, "pack", [path / mf.CORE_FILE, stub], LeafStore.from_pack(path, m, checksums=checksums),
            m.core_bytes, m.expert_bytes, m.n_expert, m.n_expert_used, m.source.sha256, stub_dir,
        )
    model = analyze(read_layout(path)).require_moe()
    return Source(
        path, "gguf", [path], LeafStore.from_gguf(model, checksums=checksums),
        model.core_bytes, model.expert_bytes, model.n_expert, model.n_expert_used, _gguf_identity(path),
    )


def model_identity(path: Path) -> tuple[str, int, int]:
    """(identity, layers, experts per layer) of a pack or a plain MoE GGUF, without loading it."""
    if path.is_dir():
        m = mf.load(path)
        return m.source.sha256, m.n_layer, m.n_expert
    model = analyze(read_layout(path)).require_moe()
    return _gguf_identity(path), model.n_layer, model.n_expert


def _gguf_identity(path: Path) -> str:
    """A plain GGUF's identity without hashing gigabytes: its size and the sha256 of its first MiB
    (header, metadata and tensor table: what a different model cannot share)."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    return hashlib.sha256(str(path.stat().st_size).encode() + b"\0" + head).hexdigest()


def _io_read_bytes() -> int:
    try:
        return int(psutil.Process().io_counters().read_bytes)  # type: ignore[attr-defined]
    except (AttributeError, psutil.Error):
        return 0


@dataclass
class GenStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    ttft_seconds: float = 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        n = self.generated_tokens - 1  # the first token comes from prefill
        return n / self.decode_seconds if self.decode_seconds and n > 0 else 0.0


@dataclass
class Generation:
    tokens: list[int]
    text: str
    logits: list[np.ndarray] = field(repr=False, default_factory=list)
    stats: GenStats = field(default_factory=GenStats)


class Engine:
    """One model, one context, experts paged through an X-Slot of ``budget`` bytes."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        budget: int | str | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_ubatch: int = 512,
        checksums: str = "first",
        n_gpu_layers: int = 0,
        policy: str = "lru",
        trace: str | os.PathLike[str] | None = None,
        speculate: bool = True,
        speculate_threshold: float = DEFAULT_THRESHOLD,
        profile: str | os.PathLike[str] | None = "auto",
        learn: bool = True,
        pin: int = 0,
        pipeline: bool = False,
    ) -> None:
        """``profile``: the tree-map file ("auto": under the user's cache directory, keyed by the
        model; None: no profile). ``learn``: merge this session's leaf use into it at close.
        ``pin``: keep the profile's ``pin`` most used leaves resident, outside the policy."""
        t0 = time.perf_counter()
        io0 = _io_read_bytes()
        self.source = open_source(Path(path), checksums)
        src = self.source
        self.xslot = XSlot()
        self.residency: Residency | None = None
        self._model = None
        self._ctx = None
        try:
            self.budget = self._resolve_budget(budget)
            self._load_model(n_gpu_layers)
            self.residency = Residency.over(self.xslot, src.store, self.budget, src.n_expert, policy)
            # Below a budget that holds every leaf, leaves are paged: what the threads, pipelining,
            # speculation, the tree-map and the warm start are chosen for (at start-up).
            self.paging = self.budget < self.residency.total_cost
            # One layer's selected leaves must fit at once: shrink the micro-batch until they do.
            need_per_token = src.n_expert_used * self.residency.max_leaf_cost
            min_budget = self.min_budget = need_per_token
            if self.budget < min_budget:
                raise SmoeError(
                    f"budget {self.budget} bytes is below the minimum for one token: "
                    f"{min_budget} bytes ({src.n_expert_used} leaves of {self.residency.max_leaf_cost})"
                )
            self.warnings: list[str] = []
            self._open_profile(profile, learn, pin)
            self.n_ubatch = self.residency.micro_batch(src.n_expert_used, n_ubatch, self.budget - self.pinned_bytes)
            self.n_batch = max(n_batch, self.n_ubatch)
            # Part pipelining: a missed leaf's gate/up parts are read at the top-k gate, its down
            # parts meanwhile by the I/O thread, awaited at the node before the down matmul.
            pipelined = pipeline and self.paging
            self.residency.pipeline = pipelined
            down_nodes = {n: KIND_BEFORE_DOWN for n in archs.NODE_BEFORE_DOWN} if pipelined else {}
            self.gate = Gate(self.residency.on_experts, state=self.residency.state,
                             max_ids=self.n_ubatch * src.n_expert + 1024, nodes=down_nodes,
                             on_node=lambda _kind, layer, _t: self.residency.finish_layer(layer))
            self.n_threads = n_threads or _default_threads(self.paging)
            cp = stock.context_params(n_ctx=n_ctx, n_threads=self.n_threads,
                                      n_batch=self.n_batch, n_ubatch=self.n_ubatch)
            self.gate.install(cp)
            self._orchestrate(trace, speculate, speculate_threshold, Path(path).name)
            cp.op_offload = False  # never copy whole X-Slot tensors to a GPU (design notes)
            self.cparams = cp
            self._ctx = stock.new_context(self._model, cp)
            self.vocab = llama_cpp.llama_model_get_vocab(self._model)
            self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
            self.n_past = 0
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.perf_counter() - t0
        self.startup_read_bytes = _io_read_bytes() - io0
        if self._warm:  # the profile's most used leaves, in the background, as far as the budget goes
            self.residency.prefetch(self._warm, evict=False)

    # ---------------------------------------------------------------------------- setup

    def _open_profile(self, profile: str | os.PathLike[str] | None, learn: bool, pin: int) -> None:
        """Read the tree-map, pin its hottest leaves, warm the X-Slot with the next ones."""
        src, r = self.source, self.residency
        self.profile: Profile | None = None
        self.profile_path = None if profile is None else (
            tree_map.default_path(src.model_id) if str(profile) == "auto" else Path(profile))
        self._learn = learn and self.profile_path is not None
        self.pinned_bytes = 0
        self._warm: list[tuple[int, int]] = []
        if self.profile_path is None:
            if pin:
                raise SmoeError("--pin needs a profile (drop --no-profile)", 2)
            return
        self.profile, self._profile_writable = tree_map.load(
            self.profile_path, src.model_id, r.n_layer, src.n_expert, self.warnings.append)
        hot = self.profile.hottest(r.n_layer * src.n_expert)
        if pin:
            room = self.budget - self.min_budget  # one token's leaves must still fit beside the pins
            pins: list[tuple[int, int]] = []
            for key in hot[:pin]:
                cost = r.leaf_cost(key[0])
                if self.pinned_bytes + cost > room:
                    break
                pins.append(key)
                self.pinned_bytes += cost
            if len(pins) < pin:
                why = ("the profile knows no more used leaves" if len(pins) == len(hot)
                       else "no more fit beside one token's leaves")
                self.warnings.append(f"--pin {pin}: {len(pins)} leaves pinned ({why})")
            r.prefetch(pins, evict=False)
            r.drain()
            for key in pins:
                r.state.pinned[key] = 1
        self._warm = hot if self.paging else []  # prefetched once start-up is done

    def _orchestrate(self, trace: str | os.PathLike[str] | None, speculate: bool, threshold: float, name: str) -> None:
        """Attach the gate observers: the trace, next-layer speculation, the tree-map recorder."""
        src, r = self.source, self.residency
        if trace is not None:
            r.trace = Trace(trace, {
                "n_layer": r.n_layer, "n_expert": src.n_expert, "n_expert_used": src.n_expert_used,
                "leaf_cost": {str(k): v for k, v in sorted(r.costs.items())}, "total_cost": r.total_cost,
                "source": name})
            self.gate.every_gate = True  # hits too must reach the trace
        self.speculator: Speculator | None = None
        if speculate and self.paging:
            self.speculator = Speculator(src.llama_paths[0], r, src.n_expert_used, threshold)
            self.gate.observe(self.speculator)
        self.observer_switch = ObserverSwitch()  # observers only while they pay (see ObserverSwitch)
        self.recorder: tree_map.Recorder | None = None
        if self.paging and (self._learn or self.profile is not None):
            self.recorder = tree_map.Recorder(r, self.profile, src.n_expert)
            self.gate.observe(self.recorder)

    def save_profile(self) -> tree_map.Profile | None:
        """Merge this session's leaf use into the profile (done by close() unless learn=False)."""
        if not self._learn or self.recorder is None or not self._profile_writable:
            return None
        self.recorder.cut()
        windows, self.recorder.windows = self.recorder.windows, []
        if not windows:
            return None
        try:
            return tree_map.save(self.profile_path, self.source.model_id, self.residency.n_layer,
                                 self.source.n_expert, windows, self.warnings.append)
        except OSError as e:
            self.warnings.append(f"profile {self.profile_path} not saved: {e.strerror or e}")
            return None

    def _resolve_budget(self, budget: int | str | None) -> int:
        # Percentages are of the X-Slot footprint of all leaves (their bytes rounded to the pages
        # they can touch), so 100% holds every leaf.
        total = self.source.store.footprint(page_cost)
        if budget is None:
            avail = psutil.virtual_memory().available - self.source.core_bytes - MEMORY_MARGIN
            return max(0, min(total, avail))
        return budget if isinstance(budget, int) else parse_budget(budget, total)

    def _load_model(self, n_gpu_layers: int) -> None:
        mp = stock.model_params(n_gpu_layers=n_gpu_layers)
        mp.tensor_buft_overrides = self.xslot.tensor_buft_overrides()
        mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_DIRECT_IO
        paths = self.source.llama_paths
        stock.LOG.install()
        stock.LOG.clear()
        arr = (ctypes.c_char_p * len(paths))(*[str(p).encode() for p in paths])
        self._model = llama_cpp.llama_model_load_from_splits(arr, len(paths), mp)
        if self.source.stub_dir is not None:
            self.source.stub_dir.cleanup()
            self.source.stub_dir = None
        if not self._model:
            raise SmoeError(f"llama.cpp could not load {self.source.path}: {stock.LOG.reason() or 'unknown error'}")
        self.xslot.finish_loading()

    def close(self) -> None:
        if getattr(self, "recorder", None) is not None:
            self.save_profile()
            self.recorder = None
        if getattr(self, "residency", None) is not None:
            self.residency.close()
            if self.residency.trace is not None:
                self.residency.trace.close()
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None
        self.source.store.close()
        if self.source.stub_dir is not None:
            self.source.stub_dir.cleanup()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------- text

    def tokenize(self, text: str) -> list[int]:
        return stock.tokenize_with(self.vocab, text)

    def token_piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)]

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    # ---------------------------------------------------------------------------- decoding

    def decode(self, tokens: list[int]) -> None:
        """Append ``tokens`` to the context (in chunks of n_batch); raise on any gate failure."""
        n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        if self.n_past + len(tokens) > n_ctx:
            raise SmoeError(f"context full: {self.n_past} + {len(tokens)} tokens > n_ctx {n_ctx}")
        if self.recorder is not None and len(tokens) > 1:
            self.recorder.start_prompt()  # a prompt: a window of its own, and its branch is prefetched
        if len(tokens) > 1 and self.gate.observers:
            self.gate.observing = True  # the prompt's branch is found by observing its first layers
        stall0, t0 = self.residency.stats.stall_seconds, time.perf_counter()
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            arr = (llama_cpp.llama_token * len(chunk))(*chunk)  # referenced until decode returns
            if self.residency.trace is not None:
                self.residency.trace.begin(self.n_past)
            stock.LOG.clear()
            rc = llama_cpp.llama_decode(self._ctx, llama_cpp.llama_batch_get_one(arr, len(chunk)))
            self.gate.check()
            self.residency.finish_all()
            self.residency.reap_failures()
            self._after_decode()
            if rc != 0:
                raise SmoeError(f"llama_decode failed (code {rc}): {stock.LOG.reason() or 'no reason given'}")
            self.n_past += len(chunk)
        if len(tokens) == 1:
            stall = self.residency.stats.stall_seconds - stall0
            self.residency.stats.token_stalls.append(stall)
            self._adapt(time.perf_counter() - t0, stall)

    def _adapt(self, seconds: float, stall: float) -> None:
        if not self.gate.observers:
            return
        was = self.gate.observing
        on = self.observer_switch.tick(seconds, stall)
        if self.recorder is not None and not was:
            self.recorder.token_unobserved()
        if on and not was and self.speculator is not None:
            self.speculator.forget()  # its last guesses are stale
        self.gate.observing = on

    def _after_decode(self) -> None:
        """Between decodes no leaf is in use. A budget that holds every leaf is filled in the
        background (layer order); once all are resident the gate stops asking for nodes, so
        llama.cpp computes each graph in one piece, exactly as stock does."""
        r = self.residency
        if r.holds_everything():
            self.gate.gating = False
            return
        self.gate.gating = True
        if self.budget >= r.total_cost and not r.in_flight:
            missing = [(int(layer), int(e)) for layer, e in zip(*np.nonzero(r.state.resident == 0))]
            r.prefetch(missing, evict=False)

    def logits(self) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        if not ptr:
            raise SmoeError("llama.cpp returned no logits")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        self.n_past = 0

    def truncate(self, n_keep: int) -> None:
        """Roll the context back to its first ``n_keep`` tokens (KV cache removal)."""
        if not 0 <= n_keep <= self.n_past:
            raise SmoeError(f"cannot keep {n_keep} of {self.n_past} tokens")
        if n_keep < self.n_past:
            if not llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), 0, n_keep, -1):
                raise SmoeError("llama.cpp could not remove tokens from the KV cache")
            self.n_past = n_keep

    @property
    def n_ctx(self) -> int:
        return int(llama_cpp.llama_n_ctx(self._ctx))

    def set_budget(self, budget: int | str) -> None:
        """Change the X-Slot budget live (shrinking evicts at once); refuses less than one token needs."""
        b = budget if isinstance(budget, int) else parse_budget(budget, self.source.store.footprint(page_cost))
        if b < self.min_budget:
            raise SmoeError(f"budget {b} bytes is below the minimum for one token: {self.min_budget} bytes")
        if self.residency.micro_batch(self.source.n_expert_used, self.n_ubatch, b) < self.n_ubatch:
            raise SmoeError(f"budget {b} bytes is too small for this context's micro-batch of {self.n_ubatch} "
                            f"tokens; restart with this budget")
        self.residency.set_budget(b)
        self.budget = b
        self._after_decode()

    def generate(
        self,
        prompt: str | list[int],
        n_tokens: int,
        temp: float = 0.0,
        seed: int = 0,
        keep_logits: bool = False,
        stop_at_eog: bool = False,
        on_token: Callable[[int, bytes], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Generation:
        """Prefill ``prompt``, then sample ``n_tokens`` (argmax when ``temp`` is 0).

        ``prompt`` is appended to what the context already holds (``n_past``), so a chat can
        continue a conversation with only its new tokens. ``should_stop`` is asked after each
        token; when it says yes, sampling ends there. The last token sampled is never decoded."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not tokens:
            raise SmoeError("the prompt is empty")
        stats = GenStats(prompt_tokens=len(tokens))
        sampler = _Sampler(temp, seed)
        out: list[int] = []
        logits: list[np.ndarray] = []
        text = bytearray()
        try:
            t0 = time.perf_counter()
            self.decode(tokens)
            stats.prefill_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            for i in range(n_tokens):
                lg = self.logits()
                if keep_logits:
                    logits.append(lg)
                tok = sampler.pick(self._ctx, lg)
                if i == 0:
                    stats.ttft_seconds = time.perf_counter() - t0
                    t1 = time.perf_counter()
                out.append(tok)
                piece = self.token_piece(tok)
                text += piece
                if on_token is not None:
                    on_token(tok, piece)
                if stop_at_eog and self.is_eog(tok):
                    break
                if should_stop is not None and should_stop():
                    break
                if i + 1 < n_tokens:
                    self.decode([tok])
            stats.decode_seconds = time.perf_counter() - t1
        finally:
            sampler.free()
        stats.generated_tokens = len(out)
        return Generation(out, text.decode("utf-8", errors="replace"), logits, stats)

    def stats(self) -> dict[str, Any]:
        r = self.residency.stats
        st = self.source.store.stats
        return {
            "budget_bytes": self.budget,
            "n_ubatch": self.n_ubatch,
            "n_threads": self.n_threads,
            "startup_seconds": round(self.startup_seconds, 3),
            "startup_read_bytes": self.startup_read_bytes,
            "core_bytes": self.source.core_bytes,
            "leaves_loaded": r.leaves_loaded,
            "hits": r.hits + self.gate.fast_hits,
            "misses": r.misses,
            "hit_rate": round(_ratio(r.hits + self.gate.fast_hits, r.misses), 4),
            "evictions": r.evictions,
            "prefetched": r.prefetched,
            "prefetch_late": r.late,
            "prefetch_wasted": r.prefetch_wasted,
            "prefetch_cancelled": r.prefetch_cancelled,
            "bytes_read": st.bytes_read,
            "stall_seconds": round(r.stall_seconds, 4),
            "down_stall_seconds": round(r.down_stall_seconds, 4),
            "stall_per_token_p50": round(float(np.percentile(r.token_stalls, 50)), 4) if r.token_stalls else 0.0,
            "stall_per_token_p95": round(float(np.percentile(r.token_stalls, 95)), 4) if r.token_stalls else 0.0,
            "stall_per_layer": {layer: round(v, 4) for layer, v in sorted(r.per_layer_stall.items())},
            "checksum_seconds": round(st.hash_seconds, 4),
            "peak_resident_bytes": r.peak_bytes,
            "resident_bytes_now": self.residency.used,
            "direct_io": self.source.store.direct_io_used,
            "peak_rss_bytes": _peak_rss(),
            "observer_pauses": self.observer_switch.pauses,
            "speculation": self.speculator.stats.summary(self.speculator.threshold) if self.speculator else None,
        }


class _Sampler:
    """argmax for temp 0 (bit-comparable with stock greedy), else llama.cpp's temp + dist(seed)."""

    def __init__(self, temp: float, seed: int) -> None:
        self.chain = None
        if temp > 0:
            sp = llama_cpp.llama_sampler_chain_default_params()
            self.chain = llama_cpp.llama_sampler_chain_init(sp)
            llama_cpp.llama_sampler_chain_add(self.chain, llama_cpp.llama_sampler_init_temp(temp))
            llama_cpp.llama_sampler_chain_add(self.chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def pick(self, ctx: object, logits: np.ndarray) -> int:
        if self.chain is None:
            return int(np.argmax(logits))
        return int(llama_cpp.llama_sampler_sample(self.chain, ctx, -1))

    def free(self) -> None:
        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None


def _ratio(hits: int, misses: int) -> float:
    return hits / (hits + misses) if hits + misses else 1.0


def _default_threads(paging: bool) -> int:
    """Compute threads: the usable cores (at most 8), less one while paging. ggml's threads meet
    at spinning barriers many times per token (more with the gate splitting the graph); when one
    of them loses its core, to the I/O thread or to any other process, the others spin until it
    is back. On 2 cores with a busy neighbour, 2 threads decoded 0.8 tok/s where 1 did 150
    (reference model, 25% budget): one core is left to the I/O thread and the gate."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1 if paging else cores))


def _peak_rss() -> int:
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(kb if os.uname().sysname == "Darwin" else kb * 1024)
    except (ImportError, OSError):
        return 0

