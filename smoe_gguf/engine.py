"""The engine: a llama.cpp session whose routed experts live in the X-Slot, paged by the gate.

llama.cpp loads the source's files (:mod:`smoe_gguf.source`) with every routed-expert tensor sent
to the X-Slot by ``tensor_buft_overrides`` and O_DIRECT loading, so start-up reads the core and
no expert byte. At each MoE layer the gate (:mod:`smoe_gguf.gate`) stops the graph after the
router's top-k and the residency (:mod:`smoe_gguf.residency`) makes the selected leaves resident
before their matmuls run. :meth:`Engine.stream` yields tokens one at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import psutil

from . import archs, route_fit, spin, token_guess, token_memo
from . import budget as bdg
from . import llama_session as ls
from . import profile as tree_map
from .errors import SmoeError
from .fetcher import HOLD_BELOW
from .gate import KIND_BEFORE_DOWN, Gate, ObserverSwitch
from .policy import DEFAULT_POLICY
from .profile import Profile
from .readahead import PromptReadAhead
from .readpool import DEFAULT_IO_DEPTH
from .residency import Residency
from .source import open_source
from .spec_native import NativeSpeculation
from .speculate import DEFAULT_RANK, DEFAULT_THRESHOLD, LOOKAHEAD, Speculator
from .token_guess import TokenGuess
from .token_memo import TokenMemo
from .trace import Trace
from .xslot import XSlot


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


PROMPT_UBATCH = 2048  # the prompt micro-batch while paging with a budget that holds a layer of experts
WARM_PRIORITY = 0.05  # the profile's warm start: read only when nothing likelier is queued
# prefetched leaves read at once, while no gate reads, when tokens are decoded with speculation (1
# for prompts); beyond one, and while a gate reads, the reader pool's byte cap applies. A budget
# that holds every leaf lets every reader read its fill (--io-depth leaves at once).
DECODE_PREFETCH_LEAVES = 2


@dataclass
class Step:
    """One generated token: its id, its bytes, the logits it was sampled from (if kept), and the
    generation's figures so far (the same object, updated as tokens come)."""

    token: int
    piece: bytes
    logits: np.ndarray | None
    stats: GenStats


@dataclass
class RunStats:
    """An engine's figures: what ``run --stats``/``--json``, chat's status and the bench show."""

    budget_bytes: int
    n_ubatch: int
    n_threads: int  # decode
    n_threads_batch: int  # prompt micro-batches
    startup_seconds: float
    startup_read_bytes: int
    core_bytes: int
    leaves_loaded: int
    hits: int
    misses: int
    hit_rate: float
    evictions: int
    gates_with_misses_native: int  # gates with a miss that the native pager served (no Python)
    gates_with_misses_python: int  # ... that Python served
    pages_moved_bytes: int  # evicted pages handed to the leaf replacing them (no release, no fault)
    prefetched: int
    prefetch_late: int
    prefetch_wasted: int
    prefetch_cancelled: int
    prefetch_stall_saved_seconds: float
    prefetch_by_source: dict[str, dict[str, Any]]
    eviction_regret: float
    bytes_read: int
    stall_seconds: float
    down_stall_seconds: float
    stall_per_token_p50: float
    stall_per_token_p95: float
    stall_per_layer: dict[int, float]
    checksum_seconds: float
    peak_resident_bytes: int
    resident_bytes_now: int
    direct_io: bool
    peak_rss_bytes: int
    observer_pauses: int
    speculation: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Engine:
    """One model, one context, experts paged through an X-Slot of ``budget`` bytes."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        budget: int | str | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_ubatch: int | None = None,
        checksums: str = "first",
        n_gpu_layers: int = 0,
        policy: str = DEFAULT_POLICY,
        trace: str | os.PathLike[str] | None = None,
        speculate: bool = True,
        speculate_threshold: float = DEFAULT_THRESHOLD,
        speculate_rank: float = DEFAULT_RANK,
        speculate_lookahead: int = LOOKAHEAD,
        profile: str | os.PathLike[str] | None = "auto",
        learn: bool = True,
        pin: int = 0,
        pipeline: bool = False,
        io_depth: int = DEFAULT_IO_DEPTH,
        native: bool = True,
        speculate_native: bool = True,
    ) -> None:
        """``profile``: the tree-map file ("auto": under the user's cache directory, keyed by the
        model; None: no profile). ``learn``: merge this session's leaf use into it at close.
        ``pin``: keep the profile's ``pin`` most used leaves resident, outside the policy.
        ``n_ubatch``: the prompt micro-batch (default: llama.cpp's 512, or PROMPT_UBATCH while
        paging with a budget that holds a layer of experts, or of their gate/up parts, so that a
        prompt reads each leaf once; shrunk below that until a micro-batch's leaves fit, one stage
        at a time where they do not fit whole).
        ``io_depth``: leaf parts read from disk at once (the disk's best concurrency).
        ``native``: the native pager serves the gate's misses where it can; False: Python serves
        every miss (the reference implementation, for tests). ``speculate_native`` (with
        ``native``): a decoded token's gates are guessed in C (:mod:`smoe_gguf.spec_native`);
        False: by the Python observer (the reference, for tests and comparisons).
        ``speculate_rank``: experts guessed per later layer, in multiples of the experts a token
        uses; ``speculate_threshold``: of those, only the ones with at least this guessed router
        probability; ``speculate_lookahead``: MoE layers guessed ahead (see :mod:`smoe_gguf.speculate`)."""
        t0 = time.perf_counter()
        io0 = _io_read_bytes()
        if n_ctx > 0:  # llama.cpp clamps its batch to the context (and asserts on a longer one): so do we
            n_batch = min(n_batch, n_ctx)
            n_ubatch = None if n_ubatch is None else min(n_ubatch, n_ctx)
        self.source = open_source(Path(path), checksums, io_depth)
        src = self.source
        self.xslot = XSlot()
        self.residency: Residency | None = None
        self._model = None
        self._ctx = None
        self._unsettled = False  # the last decoded token's guesses not scored yet (_advance)
        self._background_entries = 1  # prefetched leaves the reader pool reads at once (_prefetch_leaves)
        try:
            self._footprint = src.store.footprint(bdg.page_cost)  # what budgets resolve against
            self.budget = self._resolve_budget(budget)
            # a budget that holds every leaf never evicts one: its X-Slot can take huge pages
            self.xslot.huge_pages = self.budget >= self._footprint
            self._load_model(n_gpu_layers)
            self.residency = Residency.over(self.xslot, src.store, self.budget, src.n_expert, policy, native)
            # Below a budget that holds every leaf, leaves are paged: what the threads, pipelining,
            # speculation, the tree-map and the warm start are chosen for (at start-up).
            self.paging = self.budget < self.residency.total_cost
            # One layer's selected leaves must fit at once: shrink the micro-batch until they do.
            self.min_budget = bdg.min_budget(self.residency.max_leaf_cost, src.n_expert_used)
            if self.budget < self.min_budget:
                raise SmoeError(
                    f"budget {self.budget} bytes is below the minimum for one token: "
                    f"{self.min_budget} bytes ({src.n_expert_used} leaves of {self.residency.max_leaf_cost})"
                )
            self.warnings: list[str] = []
            if (why := spin.paging_warning(self.paging)) is not None:
                self.warnings.append(why)
            self._open_profile(profile, learn, pin)
            room = self.budget - self.pinned_bytes
            # A prompt micro-batch's leaves at one layer must fit at once: whole, or where they do
            # not (paging, every leaf with gate/up and down parts), one stage of them at a time.
            r = self.residency
            split = self.paging and r.can_split
            self.layer_budget = bdg.layer_budget(r.max_stage_cost, src.n_expert)
            if n_ubatch is None:
                n_ubatch = PROMPT_UBATCH if self.paging and room >= self.layer_budget else 512
                n_ubatch = min(n_ubatch, n_ctx) if n_ctx > 0 else n_ubatch
            self.n_ubatch = r.micro_batch(src.n_expert_used, n_ubatch, room, split=split)
            r.split_prompts = split and self.n_ubatch > r.micro_batch(src.n_expert_used, self.n_ubatch, room)
            self.n_batch = max(n_batch, self.n_ubatch)
            # Part pipelining: a missed leaf's gate/up parts are read at the top-k gate, its down
            # parts meanwhile by the I/O threads, awaited at the node before the down matmul.
            pipelined = pipeline and self.paging
            self.residency.pipeline = pipelined
            down_nodes = ({n: KIND_BEFORE_DOWN for n in archs.NODE_BEFORE_DOWN}
                          if pipelined or self.residency.split_prompts else {})
            self.gate = Gate(self.residency.on_experts, state=self.residency.state,
                             max_ids=self.n_ubatch * src.n_expert + 1024, nodes=down_nodes,
                             on_node=lambda _kind, layer, _t: self.residency.finish_layer(layer))
            if self.residency.native is not None:  # misses served in C where it can
                self.gate.attach_pager(self.residency.native.address)
                self.residency.native.open_shards()
            self.n_threads = n_threads or _default_threads(self.paging)
            # a prompt micro-batch's matmuls are long: they keep every core (the readers wait on the disk)
            self.n_threads_batch = n_threads or _default_threads(False)
            cp = ls.context_params(n_ctx=n_ctx, n_threads=self.n_threads, n_threads_batch=self.n_threads_batch,
                                   n_batch=self.n_batch, n_ubatch=self.n_ubatch)
            self.gate.install(cp)
            self._orchestrate(trace, speculate, (speculate_threshold, speculate_rank, speculate_lookahead),
                              Path(path).name, native and speculate_native)
            cp.op_offload = False  # never copy whole X-Slot tensors to a GPU (design notes)
            self.cparams = cp
            self._ctx = ls.new_context(self._model, cp)
            self.vocab = llama_cpp.llama_model_get_vocab(self._model)
            self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
            self.n_past = 0
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.perf_counter() - t0
        self.startup_read_bytes = _io_read_bytes() - io0
        # The profile's most used leaves, in the background, as far as the budget goes; not where a
        # prompt is taken one stage at a time: it passes most of every layer's leaves through the
        # budget, evicting a warm start's before a gate used them, whose reads would hold the disk
        if self._warm and not self.residency.split_prompts:
            self.residency.prefetch(self._warm, evict=False, priority=WARM_PRIORITY, source="warm-start")

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
        if not self.paging and not pin:
            return  # every leaf fits: nothing to warm, pin or learn (no recorder): not read at all
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
            r.prefetch(pins, evict=False, source="pin")
            r.drain()
            for key in pins:
                r.state.pinned[key] = 1
        self._warm = hot if self.paging else []  # prefetched once start-up is done

    def _orchestrate(self, trace: str | os.PathLike[str] | None, speculate: bool,
                     guess: tuple[float, float, int], name: str, native: bool) -> None:
        """Attach the gate observers: the trace, speculation (or, without it, prompt read-ahead),
        the tree-map recorder; and (``native``, without a trace, which observes every gate)
        speculation in C for decoded tokens."""
        src, r = self.source, self.residency
        if trace is not None:
            r.trace = Trace(trace, {
                "n_layer": r.n_layer, "n_expert": src.n_expert, "n_expert_used": src.n_expert_used,
                "leaf_cost": {str(k): v for k, v in sorted(r.costs.items())}, "total_cost": r.total_cost,
                "source": name, **({"stage_cost": {str(k): list(v) for k, v in sorted(r.stage_costs.items())}}
                                   if r.can_split else {})})
            self.gate.observe(r.trace_gate, always=True)  # every gate, hits too, before its misses are read
        self.speculator: Speculator | None = None
        if speculate and self.paging:
            threshold, rank, lookahead = guess
            self.speculator = Speculator(src.core, r, src.n_expert_used, threshold, rank, lookahead)
            if self.profile_path is not None:  # earlier sessions' route fits (see route_fit)
                self.speculator.fit.load(route_fit.load_routes(
                    route_fit.routes_path(self.profile_path), src.model_id, src.n_expert, self.warnings.append))
            self.gate.observe(self.speculator)
        self.token_guess = TokenGuess(self.speculator) if self.speculator is not None else None
        # a part-by-part prompt's down parts read ahead, and its next layer's guessed gate/up parts
        r.down_ahead = r.up_ahead = self.speculator is not None
        self.spec_native: NativeSpeculation | None = None
        if self.speculator is not None and native and trace is None:
            self.spec_native = NativeSpeculation(self.speculator, self.gate)
        self.token_memo: TokenMemo | None = None
        if self.speculator is not None:
            self.token_memo = TokenMemo(r, src.n_expert_used, self.spec_native)
            self.gate.observe(self.token_memo, prompts_only=True)  # a prompt's tokens are kept too
            if self.profile_path is not None:  # what earlier sessions decoded
                self.token_memo.load(token_memo.load_memo(
                    token_memo.memo_path(self.profile_path), src.model_id, src.n_expert, self.warnings.append))
        self.observer_switch = ObserverSwitch()  # Python's observers only while they pay (see ObserverSwitch)
        self.readahead: PromptReadAhead | None = None
        if self.paging and self.speculator is None:  # speculation reads a prompt's next layer itself
            self.readahead = PromptReadAhead(r, src.n_expert, src.n_expert_used)
            self.gate.observe(self.readahead, prompts_only=True)
        self.recorder: tree_map.Recorder | None = None
        if self.paging and (self._learn or self.profile is not None):
            self.recorder = tree_map.Recorder(r, self.profile, src.n_expert)
            self.gate.observe(self.recorder)

    def save_profile(self) -> tree_map.Profile | None:
        """Merge this session's leaf use into the profile, and its route fits into the profile's
        route file (done by close() unless learn=False)."""
        if not self._learn or self.recorder is None or not self._profile_writable:
            return None
        self.settle()
        if self.speculator is not None and self.profile_path is not None:
            try:
                route_fit.save_routes(self.profile_path, self.source.model_id, self.source.n_expert,
                                      self.speculator.fit.learnt())
                self.speculator.fit.saved()
            except OSError as e:
                self.warnings.append(f"route fits beside {self.profile_path} not saved: {e.strerror or e}")
        if self.token_memo is not None and self.profile_path is not None:
            try:
                token_memo.save_memo(self.profile_path, self.source.model_id, self.source.n_expert,
                                     self.token_memo.learnt())
            except OSError as e:
                self.warnings.append(f"token memo beside {self.profile_path} not saved: {e.strerror or e}")
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
        return bdg.resolve(budget, self._footprint, self.source.core_bytes)

    def _load_model(self, n_gpu_layers: int) -> None:
        mp = ls.model_params(n_gpu_layers=n_gpu_layers)
        mp.tensor_buft_overrides = self.xslot.tensor_buft_overrides()
        mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_DIRECT_IO
        paths = self.source.llama_paths
        ls.LOG.install()
        ls.LOG.clear()
        arr = (ctypes.c_char_p * len(paths))(*[str(p).encode() for p in paths])
        self._model = llama_cpp.llama_model_load_from_splits(arr, len(paths), mp)
        if self.source.stub_dir is not None:
            self.source.stub_dir.cleanup()
            self.source.stub_dir = None
        if not self._model:
            raise SmoeError(f"llama.cpp could not load {self.source.path}: {ls.LOG.reason() or 'unknown error'}")
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
            ls.free_context(self._ctx)
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
        return ls.tokenize_with(self.vocab, text)

    def token_piece(self, token: int) -> bytes:
        return ls.token_piece(self.vocab, token)

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    # ---------------------------------------------------------------------------- decoding

    def decode(self, tokens: list[int]) -> None:
        """Append ``tokens`` to the context (in chunks of n_batch); raise on any gate failure."""
        n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        if self.n_past + len(tokens) > n_ctx:
            raise SmoeError(f"context full: {self.n_past} + {len(tokens)} tokens > n_ctx {n_ctx}")
        decoded = len(tokens) == 1 and self.gate.gating
        nat = self._native_guesser()
        # a decoded token's own guesses first where the C path already guesses (else after it
        # starts): their reads start before the last token's books are done, which is before any
        # gate of this decode runs
        early = decoded and nat is not None and nat.guessing
        self._advance(tokens[0] if early else None)
        if self.recorder is not None and len(tokens) > 1:
            self.recorder.start_prompt()  # a prompt: a window of its own, and its branch is prefetched
        if self.token_memo is not None and len(tokens) > 1:
            self.token_memo.start_prompt(tokens)
        if len(tokens) > 1 and self.gate.observers:
            self.gate.observing = True  # the prompt's branch is found by observing its first layers
        self._prefetch_leaves(self.source.store.io_depth if not self.paging
                              else DECODE_PREFETCH_LEAVES if decoded and self.speculator is not None else 1)
        if len(tokens) > 1:
            if self.spec_native is not None:
                self.spec_native.stop()  # a prompt is observed in Python
            if self.speculator is not None:
                self.speculator.forget()  # decode's guesses protect nothing a prompt needs
            # what is still queued of a warm start: a prompt streams its own leaves through the
            # budget and evicts such guesses before any gate uses them
            self.residency.cancel_below(HOLD_BELOW)
        elif nat is not None:
            # a decoded token: guessed in C, every one (it costs the gate no call into Python,
            # and the cost model prices its reads), unless every leaf is resident and no gate
            # asks; Python's observers pause
            if self.gate.gating:
                nat.start()
            else:
                nat.stop()
            self.gate.observing = False
        elif not self.gate.observes_decode:
            self.gate.observing = False  # its observers act on prompts only (read-ahead): none is called
        if decoded and not early:
            self._advance(tokens[0])
        if not self.paging:  # a budget that holds every leaf: fill it from the first decode on
            self._between_decodes()
        stall0, t0 = self.residency.stats.stall_seconds, time.perf_counter()
        try:
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start : start + self.n_batch]
                arr = (llama_cpp.llama_token * len(chunk))(*chunk)  # referenced until decode returns
                if self.residency.trace is not None:
                    self.residency.trace.begin(self.n_past)
                # a prompt in micro-batches of several tokens: lfru evicts in layer order (policy.py)
                self.residency.state.scan[0] = len(chunk) > 1 and self.n_ubatch > 1
                ls.LOG.clear()
                # Signals are held only where llama.cpp may call Python (the gate): a decode that gates
                # nothing enters only native code (the X-Slot's answers to the scheduler are C too)
                with ls.signals_deferred() if self.gate.gating else contextlib.nullcontext():
                    rc = llama_cpp.llama_decode(self._ctx, llama_cpp.llama_batch_get_one(arr, len(chunk)))
                self.gate.check()
                self.residency.finish_all()
                self.residency.reap_failures()
                self.residency.drain_native()
                self._between_decodes()
                if rc != 0:
                    raise SmoeError(f"llama_decode failed (code {rc}): {ls.LOG.reason() or 'no reason given'}")
                self.n_past += len(chunk)
        finally:
            self.residency.state.scan[0] = 0  # only while a prompt is gated
            if self.token_memo is not None:
                self.token_memo.end_prompt()
        self._unsettled = decoded  # its guesses scored at the next decode, once that one's are queued
        if len(tokens) == 1:
            stall = self.residency.stats.stall_seconds - stall0
            self.residency.stats.token_stalls.append(stall)
            self._adapt(time.perf_counter() - t0, stall)

    def _prefetch_leaves(self, n: int) -> None:
        """Let ``n`` prefetched leaves be read at once from now on (set only when it changes)."""
        if n != self._background_entries:
            self.source.store.set_background_entries(n)
            self._background_entries = n

    def _advance(self, token: int | None) -> None:
        """Between decodes: given the next decoded ``token``, queue the reads guessed from it
        first, in one prefetch: its first MoE layer's (read while the graph reaches it) and its
        later layers' from its earlier decodes. Then score the last decoded token's guesses
        against what its gates picked, and take in the C path's counts (deferred from the end
        of its decode). Each guesser keeps one guess pending; the last token's is taken aside
        before the next one is made, and scored after the next one is queued (no gate runs in
        between, so it is scored against the same picks). A token that follows itself is
        guessed from its decodes before the last one."""
        due, self._unsettled = self._unsettled, False
        tg, memo = self.token_guess, self.token_memo
        tg_last = tg.take_pending() if due and tg is not None else None
        memo_last = memo.take_pending() if due and memo is not None else None
        if token is not None:
            keys: list[tuple[int, int]] = []
            prios: list[float] = []
            sources: list[str] = []
            for guesser, source in ((tg, token_guess.SOURCE), (memo, token_memo.SOURCE)):
                if guesser is not None:
                    k, p = guesser.guess(token)
                    keys += k
                    prios += p
                    sources += [source] * len(k)
            if keys:
                self.residency.prefetch(keys, layer=min(self.residency.costs), in_use=[], priority=prios,
                                        source=sources)
        if tg is not None and tg_last is not None:
            tg.score(tg_last)
        if memo is not None and memo_last is not None:
            memo.score(memo_last)
        if due and self.spec_native is not None:
            self.spec_native.take_counts()

    def settle(self) -> None:
        """Take in the last decoded token's books (see :meth:`_advance`) before figures are read."""
        self._advance(None)

    def _adapt(self, seconds: float, stall: float) -> None:
        if not self.gate.observes_decode:
            return
        if self._native_guesser() is not None:  # speculation in C, at every token (see decode)
            if self.recorder is not None:
                self.recorder.token_unobserved()  # the recorder recovers the token from the use counts
            return
        was = self.gate.observing
        on = self.observer_switch.tick(seconds, stall)
        if self.recorder is not None and not was:
            self.recorder.token_unobserved()
        if on != was and self.speculator is not None:
            self.speculator.forget()  # its last guesses are stale, or no gate would clear their protection
        self.gate.observing = on

    def _native_guesser(self) -> NativeSpeculation | None:
        """Speculation's C path where decoded tokens are guessed there (it is on and the
        speculator has read its routers), else None."""
        nat = self.spec_native
        return nat if nat is not None and nat.ready() else None

    def _between_decodes(self) -> None:
        """Between decodes no leaf is in use. A budget that holds every leaf is filled in the
        background (layer order), from the first decode on, beside the gate's own reads; once all
        are resident the gate stops asking for nodes, so llama.cpp computes each graph in one
        piece, exactly as stock does."""
        r = self.residency
        if r.holds_everything():
            self.gate.gating = False
            return
        self.gate.gating = True
        if self.budget >= r.total_cost and not r.in_flight:
            missing = [(int(layer), int(e)) for layer, e in zip(*np.nonzero(r.state.resident == 0))]
            r.prefetch(missing, evict=False, source="fill")

    def logits(self) -> np.ndarray:
        return ls.last_logits(self._ctx, self.n_vocab)

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
    def model(self) -> llama_cpp.llama_model_p:
        """The loaded llama.cpp model (for its chat template and metadata)."""
        return self._model

    @property
    def n_ctx(self) -> int:
        return int(llama_cpp.llama_n_ctx(self._ctx))

    def prompt_hint(self, n_tokens: int) -> str | None:
        """A one-line hint when a prompt of ``n_tokens`` will stream experts more than once: the
        budget is below one layer of experts (where leaves are served one stage at a time, of
        their larger stage), so the micro-batch is cut short."""
        if not self.paging or self.budget >= self.layer_budget or n_tokens <= self.n_ubatch:
            return None
        src, r = self.source, self.residency
        k, e, m = src.n_expert_used, src.n_expert, self.n_ubatch
        distinct = e * (1 - (1 - k / e) ** m)  # experts a micro-batch of m tokens selects per layer
        per_token = len(r.costs) * distinct * r.max_leaf_cost / m
        return (f"the budget holds less than one layer of experts at once: prompts go in micro-batches of {m} tokens "
                f"and read about {per_token / 2**20:.1f} MiB of experts per prompt token; "
                f"--budget {-(-self.layer_budget // 2**20)}MiB or more reads each leaf once per prompt")

    def set_budget(self, budget: int | str) -> None:
        """Change the X-Slot budget live (shrinking evicts at once); refuses less than one token needs."""
        b = self._resolve_budget(budget)
        if b < self.min_budget:
            raise SmoeError(f"budget {b} bytes is below the minimum for one token: {self.min_budget} bytes")
        r = self.residency
        if r.micro_batch(self.source.n_expert_used, self.n_ubatch, b, split=r.split_prompts) < self.n_ubatch:
            raise SmoeError(f"budget {b} bytes is too small for this context's micro-batch of {self.n_ubatch} "
                            f"tokens; restart with this budget")
        if b < self._footprint:
            self.xslot.huge_pages = False  # leaves may be evicted: small pages from now on
        self.residency.set_budget(b)
        self.budget = b
        self._between_decodes()

    def stream(self, prompt: str | list[int], n_tokens: int, sampling: ls.Sampling | None = None,
               keep_logits: bool = False, stop_at_eog: bool = False) -> Iterator[Step]:
        """Prefill ``prompt``, then yield up to ``n_tokens`` sampled tokens, one :class:`Step` each.

        ``prompt`` is appended to what the context already holds (``n_past``), so a conversation
        continues with only its new tokens. A token is decoded into the context only when the
        next one is asked for: a caller that stops early leaves its last token undecoded."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not tokens:
            raise SmoeError("the prompt is empty")
        stats = GenStats(prompt_tokens=len(tokens))
        sampler = ls.Sampler(self._ctx, sampling or ls.Sampling())
        try:
            t0 = time.perf_counter()
            self.decode(tokens)
            stats.prefill_seconds = time.perf_counter() - t0
            t1 = t0
            for i, (tok, lg) in enumerate(ls.sample_tokens(lambda t: self.decode(t), self.logits, sampler, n_tokens,
                                                          want_logits=keep_logits)):
                if i == 0:
                    t1 = time.perf_counter()
                    stats.ttft_seconds = t1 - t0
                stats.generated_tokens = i + 1
                stats.decode_seconds = time.perf_counter() - t1
                yield Step(tok, self.token_piece(tok), lg if keep_logits else None, stats)
                if stop_at_eog and self.is_eog(tok):
                    return
        finally:
            sampler.free()
            self.settle()

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
        """:meth:`stream` collected: every token, the text, the logits if kept, the figures.
        ``on_token`` sees each token as it comes; ``should_stop``, asked after each, ends early."""
        gen = Generation([], "", [], GenStats())
        text = bytearray()
        for step in self.stream(prompt, n_tokens, ls.Sampling(temp, seed), keep_logits, stop_at_eog):
            gen.stats = step.stats
            gen.tokens.append(step.token)
            text += step.piece
            if step.logits is not None:
                gen.logits.append(step.logits)
            if on_token is not None:
                on_token(step.token, step.piece)
            if should_stop is not None and should_stop():
                break
        gen.text = text.decode("utf-8", errors="replace")
        return gen

    def stats(self) -> RunStats:
        """The session's figures so far: start-up, paging, reads, stalls, memory."""
        self.settle()
        self.residency.settle_prefetches()
        r = self.residency.stats
        st = self.source.store.stats
        hits = r.hits + self.gate.fast_hits
        return RunStats(
            budget_bytes=self.budget,
            n_ubatch=self.n_ubatch,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads_batch,
            startup_seconds=round(self.startup_seconds, 3),
            startup_read_bytes=self.startup_read_bytes,
            core_bytes=self.source.core_bytes,
            leaves_loaded=r.leaves_loaded,
            hits=hits,
            misses=r.misses,
            hit_rate=round(_ratio(hits, r.misses), 4),
            evictions=r.evictions,
            gates_with_misses_native=r.native_gates,
            gates_with_misses_python=r.gates - r.native_gates,
            pages_moved_bytes=r.moved_bytes,
            prefetched=r.prefetched,
            prefetch_late=r.late,
            prefetch_wasted=r.prefetch_wasted,
            prefetch_cancelled=r.prefetch_cancelled,
            prefetch_stall_saved_seconds=round(r.stall_saved_seconds, 4),
            prefetch_by_source={k: c.as_dict() for k, c in sorted(r.by_source.items())},
            eviction_regret=round(self.residency.eviction_regret(), 4),
            bytes_read=st.bytes_read,
            stall_seconds=round(r.stall_seconds, 4),
            down_stall_seconds=round(r.down_stall_seconds, 4),
            stall_per_token_p50=_percentile(r.token_stalls, 50),
            stall_per_token_p95=_percentile(r.token_stalls, 95),
            stall_per_layer={layer: round(v, 4) for layer, v in sorted(r.per_layer_stall.items())},
            checksum_seconds=round(st.hash_seconds, 4),
            peak_resident_bytes=r.peak_bytes,
            resident_bytes_now=self.residency.used,
            direct_io=self.source.store.direct_io_used,
            peak_rss_bytes=peak_rss(),
            observer_pauses=self.observer_switch.pauses,
            speculation=self._speculation_summary(),
        )

    def _speculation_summary(self) -> dict[str, Any] | None:
        if self.speculator is None:
            return None
        out = self.speculator.summary()
        out["native_unlocated"] = self.spec_native.unlocated if self.spec_native is not None else 0
        if self.token_guess is not None:
            out["first_layer"] = self.token_guess.summary()
        if self.token_memo is not None:
            out["memo"] = self.token_memo.summary()
        return out


def _ratio(hits: int, misses: int) -> float:
    return hits / (hits + misses) if hits + misses else 1.0


def _percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 4) if values else 0.0


def _default_threads(paging: bool) -> int:
    """Compute threads: the usable cores (at most 8), less one for decoding while leaves are paged.
    The readers, their I/O completions and the orchestration take a core then; ggml's threads
    meet at barriers many times per token (more with the gate splitting the graph), and one that
    loses its core, or sleeps through a gate's wait, holds up the others until it is back."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1 if paging else cores))


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM on Linux, ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb if os.uname().sysname == "Darwin" else kb * 1024)
