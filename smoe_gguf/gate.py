"""The router gate: a ``cb_eval`` that stops the graph after each layer's expert selection.

llama.cpp's scheduler asks ``cb_eval(t, ask=True)`` for every graph node; the gate answers true
for ``ffn_moe_topk-<layer>`` (the ids of the selected experts, written by ``build_moe_ffn``) and
for any other node prefix it was given. The scheduler then computes the graph up to that node
and calls ``cb_eval(t, ask=False)``. The expert matmuls run only after that call returns, so
whatever it makes resident is what they read.

The callback is C (``_gatecb.c``): the ask for each of the ~450 nodes of a token, and a top-k
gate whose leaves are all resident (a hit: it stamps the shared access arrays the eviction
policies read), never enter Python. With a native pager attached (:meth:`Gate.attach_pager`,
``_pager.c``), a miss is served in C too, where the pager can. Anything else (a miss the pager
leaves to Python, or a node of another kind) calls back into Python: ``on_experts(layer, ids)``
must make the leaves resident before it returns; ``on_node(kind, layer, tensor_address)``
handles the other kinds. Observers (:meth:`Gate.observe`: the trace, next-layer speculation)
make every top-k gate call Python; each is called with the top-k node, whose inputs it may read,
before the gate's misses are read (what it prefetches is read behind them), or after a gate of
hits has been stamped.
With :attr:`gating` off the gate asks for nothing: llama.cpp computes each graph in one piece,
exactly as without a callback (for a budget that holds every leaf, once all are resident).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from ctypes import POINTER, Structure, c_char, c_double, c_int32, c_int64, c_size_t, c_uint8, c_uint32, c_uint64, c_void_p

import numpy as np

from . import archs, native
from . import ggml_abi as abi
from .errors import SmoeError
from .policy import AccessState

ExpertsHook = Callable[[int, np.ndarray], None]
NodeHook = Callable[[int, int, int], None]  # (kind, layer, tensor address)
GateObserver = Callable[[int, int, np.ndarray], None]  # (layer, top-k node address, ids)

KIND_TOPK = 0
KIND_BEFORE_DOWN = 1  # the activation node before the down matmul (part pipelining)
KIND_OBSERVE = 2  # a top-k gate: Python calls its observers only (C served it, or serves it next)
KIND_SERVE = 3  # a top-k gate whose observers were called: Python serves it only
KIND_PREFETCH = 4  # native speculation chose prefetches for Python to queue (spec_native)
SLOWER_BY = 1.5  # observers pause only where their tokens were slower by this many standard errors
_KIND_TOPK_UNREAD = -1  # a top-k node too large for the C scratch: Python reads it
MAX_PREFIX = 4
PREFIX_LEN = 32

_SLOW = ctypes.CFUNCTYPE(c_int32, c_void_p, c_int32, c_int32, c_int32)
_TENSOR_GET = ctypes.CFUNCTYPE(None, c_void_p, c_void_p, c_size_t, c_size_t)


class _GateStruct(Structure):
    """``struct smoe_gate`` in _gatecb.c (checked against its sizeof at load)."""

    _fields_ = [
        ("gating", c_int32),
        ("n_prefix", c_int32),
        ("prefix_len", c_int32 * MAX_PREFIX),
        ("kind", c_int32 * MAX_PREFIX),
        ("prefix", (c_char * PREFIX_LEN) * MAX_PREFIX),
        ("off_ne", c_int64),
        ("off_nb", c_int64),
        ("off_name", c_int64),
        ("n_layer", c_int32),
        ("n_expert", c_int32),
        ("resident", POINTER(c_uint8)),
        ("last_use", POINTER(c_uint64)),
        ("uses", POINTER(c_uint32)),
        ("clock", POINTER(c_uint64)),
        ("freq", POINTER(c_double)),
        ("half_life", c_double),
        ("token_weight", c_double),
        ("fast_hits", c_uint64),
        ("fast_gates", c_uint64),
        ("ids", POINTER(c_int32)),
        ("ids_cap", c_int64),
        ("ids_rows", c_int32),
        ("ids_cols", c_int32),
        ("ids_row_stride", c_int64),
        ("tensor_get", c_void_p),
        ("slow", _SLOW),
        ("failed", c_int32),
        ("every_gate", c_int32),
        ("node_wanted", POINTER(c_uint8)),
        ("pager", c_void_p),
        ("spec", c_void_p),
    ]


def _lib() -> ctypes.CDLL:
    lb = native.lib()
    native.check_sizeof(lb, "gate", ctypes.sizeof(_GateStruct), "gate.py")
    return lb


class Gate:
    """``cb_eval`` for ``llama_context_params``: call :meth:`install` on the params.

    ``state`` holds the residency the C path checks (``state.resident``) and stamps on hits;
    without one every top-k gate goes to ``on_experts``. ``ids`` passed to ``on_experts`` are int32
    ``[n_tokens, n_expert_used]`` (one row per token of the micro-batch), valid only during the
    call. It is not called for a node with no rows (llama.cpp's last layer computes only the
    tokens whose logits are wanted: none for a prompt chunk whose batch asks for no output).
    An exception in a hook stops the graph: call :meth:`check` after every ``llama_decode``
    (the decode itself reports success in that case; its output is garbage).
    Keep the object alive as long as the context that holds the callback.
    """

    def __init__(
        self,
        on_experts: ExpertsHook,
        state: AccessState | None = None,
        n_layer: int = 512,
        n_expert: int = 512,
        max_ids: int = 1 << 16,
        nodes: dict[str, int] | None = None,
        on_node: NodeHook | None = None,
    ) -> None:
        abi.ensure_layout()
        self._lib = _lib()
        self.on_experts = on_experts
        self.on_node = on_node
        self.state = state if state is not None else AccessState.new(n_layer, n_expert)
        self.error: BaseException | None = None
        self.py_gates = 0
        self.py_nodes = 0  # nodes of other kinds seen in Python (the down node: only where wanted)
        self.observers: list[GateObserver] = []
        self._observing = True  # observers are called (see :attr:`observing`)
        self._always: list[GateObserver] = []  # observers never paused (a trace)
        self.observes_decode = False  # a pausable observer acts on a decoded token (see observe)
        self.on_prefetch: ExpertsHook | None = None  # native speculation's prefetches (attach_spec)
        s = self.state
        st = _GateStruct()
        nodes = {archs.NODE_TOPK: KIND_TOPK, **(nodes or {})}
        if len(nodes) > MAX_PREFIX:
            raise SmoeError(f"at most {MAX_PREFIX} gated node kinds")
        for i, (node, kind) in enumerate(nodes.items()):
            prefix = (node + "-").encode()
            if len(prefix) >= PREFIX_LEN:
                raise SmoeError(f"gate node name {node!r} is too long")
            st.prefix[i].value = prefix
            st.prefix_len[i] = len(prefix)
            st.kind[i] = kind
        st.n_prefix = len(nodes)
        st.off_ne = abi.GgmlTensor.ne.offset  # type: ignore[attr-defined]
        st.off_nb = abi.GgmlTensor.nb.offset  # type: ignore[attr-defined]
        st.off_name = abi.TENSOR_NAME_OFFSET
        st.n_layer, st.n_expert = s.n_layer, s.n_expert
        st.half_life = s.half_life
        st.token_weight = s.token_weight
        for name in ("resident", "last_use", "uses", "clock", "freq", "node_wanted"):
            arr = getattr(s, name)
            if not arr.flags.c_contiguous:
                raise SmoeError(f"access state {name} must be contiguous")
            setattr(st, name, arr.ctypes.data_as(type(getattr(st, name))))
        self._ids = np.zeros(max(max_ids, 1024), np.int32)
        st.ids = self._ids.ctypes.data_as(POINTER(c_int32))
        st.ids_cap = self._ids.size
        st.tensor_get = native.function_address(abi.ggml_backend_tensor_get)
        self._slow = _SLOW(self._on_slow)  # referenced: C holds the pointer
        st.slow = self._slow
        st.gating = 1
        self._st = st
        self.user_data = ctypes.addressof(st)
        self.callback = abi.EvalCallback(native.function_address(self._lib.smoe_gate_cb))

    def observe(self, observer: GateObserver, always: bool = False, prompts_only: bool = False) -> None:
        """Call ``observer(layer, node, ids)`` at every top-k gate (all gates then enter Python),
        before the gate's misses are read. ``always``: never paused by :attr:`observing` (a trace).
        ``prompts_only``: it acts on prompt micro-batches only, so a decoded token need not call
        it. :attr:`observes_decode` counts neither (an ``always`` one has no switch to pause it)."""
        (self._always if always else self.observers).append(observer)
        self.observes_decode = self.observes_decode or not (prompts_only or always)
        self._sync()

    @property
    def every_gate(self) -> bool:
        """True: every top-k gate calls Python (its observers)."""
        return bool(self._st.every_gate)

    @property
    def observing(self) -> bool:
        """False: observers are skipped and hits stay in C (the engine pauses observers while
        there is no stall for them to hide)."""
        return self._observing

    @observing.setter
    def observing(self, on: bool) -> None:
        self._observing = on
        self._sync()

    def _sync(self) -> None:
        self._st.every_gate = 1 if self._always or (self._observing and self.observers) else 0

    def attach_pager(self, address: int | None) -> None:
        """Serve misses with the native pager at ``address`` (a ``struct smoe_pager`` that
        outlives the gate's use; it serves only while enabled), or never (None)."""
        self._st.pager = address

    def attach_spec(self, address: int | None, on_prefetch: ExpertsHook | None = None) -> None:
        """Guess a decoded token's gates in C with the ``struct smoe_spec`` at ``address`` (see
        spec_native; it guesses only while enabled and while observers are paused), calling
        ``on_prefetch(layer, ids)`` for the prefetches it chose; or never (None)."""
        self._st.spec = address
        self.on_prefetch = on_prefetch

    def install(self, cparams: object) -> None:
        """Point ``cparams.cb_eval`` / ``cb_eval_user_data`` at this gate."""
        cparams.cb_eval = self.callback  # type: ignore[attr-defined]
        cparams.cb_eval_user_data = self.user_data  # type: ignore[attr-defined]

    @property
    def gating(self) -> bool:
        return bool(self._st.gating)

    @gating.setter
    def gating(self, on: bool) -> None:
        self._st.gating = 1 if on else 0

    @property
    def fast_hits(self) -> int:
        """Leaf hits served by the C path (distinct leaves per gate)."""
        return int(self._st.fast_hits)

    @property
    def n_gated(self) -> int:
        """Top-k gates with rows seen, by either path."""
        return int(self._st.fast_gates) + self.py_gates

    def check(self) -> None:
        """Raise the hooks' failure, if any, and clear it. A hook that failed without recording an
        error lost it to ctypes: an exception raised by a signal handler before the hook's first
        line, which is Ctrl-C's KeyboardInterrupt or exits.Terminated; it is re-raised as an interrupt."""
        failed, self._st.failed = bool(self._st.failed), 0
        if self.error is None and failed:
            self.error = KeyboardInterrupt()
        if self.error is not None:
            err, self.error = self.error, None
            if isinstance(err, SmoeError) or not isinstance(err, Exception):
                raise err  # a user-facing failure, or an interrupt (Ctrl-C, a termination signal)
            raise SmoeError(f"X-Slot gate failed: {err!r}") from err

    # ------------------------------------------------------------------------ Python path

    def _on_slow(self, t: int, kind: int, layer: int, n_tokens: int) -> int:
        try:
            if kind in (KIND_TOPK, KIND_OBSERVE, KIND_SERVE, KIND_PREFETCH):
                st = self._st
                ids = np.lib.stride_tricks.as_strided(
                    self._ids, shape=(st.ids_rows, st.ids_cols), strides=(st.ids_row_stride * 4, 4), writeable=False
                )
                if kind == KIND_TOPK:
                    self._topk(t, layer, ids)
                elif kind == KIND_OBSERVE:
                    self._observe(t, layer, ids)
                elif kind == KIND_PREFETCH:
                    if self.on_prefetch is not None:
                        self.on_prefetch(layer, ids)
                else:
                    self._serve(layer, ids)
            elif kind == _KIND_TOPK_UNREAD:
                ids = self._read(t)
                if ids.shape[0]:
                    self._topk(t, layer, ids)
            elif self.on_node is not None:
                self.py_nodes += 1
                self.on_node(kind, layer, t)
            return 1
        except BaseException as e:  # noqa: BLE001 - must not unwind into C
            if self.error is None:  # keep the first failure: later ones follow from it
                self.error = e
            return 0

    def _topk(self, t: int, layer: int, ids: np.ndarray) -> None:
        self._observe(t, layer, ids)
        self._serve(layer, ids)

    def _serve(self, layer: int, ids: np.ndarray) -> None:
        self.py_gates += 1
        self.on_experts(layer, ids)

    def _observe(self, t: int, layer: int, ids: np.ndarray) -> None:
        for observer in self._always:
            observer(layer, t, ids)
        if self._observing and self.observers:
            for observer in self.observers:
                observer(layer, t, ids)

    def _read(self, t: int) -> np.ndarray:
        tt = abi.tensor_at(t)
        n_used, n_tokens, row_stride = tt.ne[0], tt.ne[1], tt.nb[1]
        if n_tokens == 0:
            return np.zeros((0, n_used), np.int32)
        nbytes = abi.ggml_nbytes(t)
        buf = np.empty(nbytes // 4 + 1, np.int32)
        abi.ggml_backend_tensor_get(t, buf.ctypes.data, 0, nbytes)
        return np.lib.stride_tricks.as_strided(buf, shape=(n_tokens, n_used), strides=(row_stride, 4), writeable=False)


class ObserverSwitch:
    """Whether a gate's Python observers (speculation, the tree-map) run, decided from decode
    timings. Speculation in C (:mod:`smoe_gguf.spec_native`), where the speculator has it, guesses
    every decoded token instead, without asking the switch. Each Python observer costs a call
    into Python at every top-k gate, and its prefetches take the disk and cores from the gate's
    own reads; it pays only where it hides more stall than that. So decode measures, observers
    on and off in turns of ``block`` tokens, ordered on, off, off, on (a steady drift, such as a
    cache warming up after a prompt, weighs on both alike), and then holds a state for ``hold``
    tokens and measures again, sooner if half of the last ``window`` tokens each stalled longer
    than the held state's mean token took (a change of topic: one stalling token alone is not).

    The observers are paused only where their tokens were measurably slower: by more than
    ``slower_by`` standard errors of the difference of the two states' mean token times. After
    ``2 * window`` tokens, and after each further round of turns up to ``4 * window``, a clear
    difference decides; where none shows by then the observers stay on: they are the configured
    behaviour, and a difference too small to measure is worth the hits they bring. Token
    times vary by several milliseconds with the misses each one meets, and the turns cannot
    attribute a leaf one state brought in and the other hit, so an 8-against-8 comparison of
    means flips with noise. :meth:`tick` takes one decoded token and returns the observing state
    to set from now on."""

    def __init__(self, window: int = 8, hold: int = 128, block: int = 2, slower_by: float = SLOWER_BY) -> None:
        self.window, self.hold, self.block, self.slower_by = window, hold, block, slower_by
        self.phase = "measure"  # "measure": turns with and without; "hold": keeping one; "fixed"
        self.observing = True
        self.pauses = 0  # times observers were found not to pay
        self._n = 0
        self._sums = {True: [0, 0.0, 0.0], False: [0, 0.0, 0.0]}  # per state: tokens, seconds, seconds squared
        self._held = 0.0  # the held state's mean token, while holding
        self._stalls: list[float] = []  # the last ``window`` tokens' stalls, while holding

    def keep(self, on: bool) -> None:
        """Observe (or not) every token from now on, without measuring."""
        self.phase, self.observing = "fixed", on

    def tick(self, seconds: float, stall: float) -> bool:
        """``seconds``: the token's time; ``stall``: what it waited on reads."""
        self._n += 1
        if self.phase == "measure":
            acc = self._sums[self.observing]
            acc[0] += 1
            acc[1] += seconds
            acc[2] += seconds * seconds
            verdict = self._verdict() if self._n >= 2 * self.window and self._n % (4 * self.block) == 0 else None
            if verdict is not None:
                self.pauses += not verdict
                n, total, _ = self._sums[verdict]
                self._held = total / max(1, n)
                self._enter("hold", verdict)
            else:
                self.observing = (self._n // self.block) % 4 in (0, 3)  # on, off, off, on, ...
        elif self.phase == "hold":
            self._stalls = [*self._stalls[1 - self.window:], stall]
            sustained = 2 * sum(x > self._held for x in self._stalls) >= self.window
            if self._n >= self.hold or sustained:
                self._enter("measure", True)
        return self.observing

    def _verdict(self) -> bool | None:
        """True: keep the observers; False: pause them; None: measure on."""
        (n_on, s_on, q_on), (n_off, s_off, q_off) = self._sums[True], self._sums[False]
        if n_on < 2 or n_off < 2:
            return None
        m_on, m_off = s_on / n_on, s_off / n_off
        var_on = max(0.0, (q_on - n_on * m_on * m_on) / (n_on - 1))
        var_off = max(0.0, (q_off - n_off * m_off * m_off) / (n_off - 1))
        margin = self.slower_by * math.sqrt(var_on / n_on + var_off / n_off)
        if m_on - m_off > margin:
            return False
        if m_off - m_on > margin or self._n >= 4 * self.window:
            return True
        return None

    def _enter(self, phase: str, observing: bool) -> None:
        self.phase, self.observing = phase, observing
        self._n, self._stalls = 0, []
        self._sums = {True: [0, 0.0, 0.0], False: [0, 0.0, 0.0]}
