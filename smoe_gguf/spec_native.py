"""Speculation at a decoded token's gates, in C (``_speculate.c``): the tables it reads.

:class:`~smoe_gguf.speculate.Speculator` holds the method and what is learnt: the routers, the
route fits, the chance of use of each guess rank, the scores. Run in Python at every gate it
costs the gate's thread about a millisecond, which at a budget of many hits is about what its
prefetches save. Once the speculator has its routers (read at the first gate it observes), a
decoded token's gates are guessed in C from tables built here:
- per gated layer and lookahead, the plain projection (columns of the speculator's own matrix
  and bias, by address), the layer's own router, and the pair's fitted map where it has one;
- the chances of use by rank, and the cost model's bars (refreshed before each token).

The C path scores its guesses into the speculator's own counters, keeps the route fits'
features and hands their samples back (:meth:`NativeSpeculation.take_samples`), and enters
Python only to queue the prefetches it chose (:meth:`Residency.prefetch`, as the Python path
does). Prompt micro-batches are still observed in Python (a batch's guesses, the tree-map
recorder).
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, Structure, c_double, c_float, c_int32, c_int64, c_uint8, c_uint64, c_void_p

import numpy as np

from . import ggml_abi as abi
from . import native
from .gate import Gate
from .route_fit import PairFit
from .speculate import SEARCH_DEPTH, THRESHOLD_SWEEP, Speculator

MAX_LOOKAHEAD = 4
_SWEEP = 5
_I64P = POINTER(c_int64)


class _SpecStruct(Structure):
    """``struct smoe_spec`` in _speculate.h (checked against its sizeof at load)."""

    _fields_ = [
        ("enabled", c_int32),
        ("n_layer", c_int32), ("n_expert", c_int32), ("n_embd", c_int32), ("lookahead", c_int32),
        ("n_guess", c_int32), ("max_rank", c_int32), ("n_sweep", c_int32),
        ("sigmoid", c_int32),
        ("n_src", c_int32), ("search_depth", c_int32),
        ("off_ne", c_int64), ("off_nb", c_int64), ("off_src", c_int64), ("off_name", c_int64),
        ("threshold", c_double),
        ("sweep", c_double * _SWEEP),
        ("bar_free", c_double), ("bar_full", c_double), ("bar_ahead", c_double),
        ("max_leaf_cost", c_int64),
        ("ledger", _I64P),
        ("resident", POINTER(c_uint8)), ("protect", POINTER(c_uint8)), ("in_flight", POINTER(c_uint8)),
        ("target", POINTER(c_int32)),
        ("matrix", _I64P), ("stride", _I64P), ("bias", _I64P),
        ("fit", _I64P), ("wanted", POINTER(c_uint8)),
        ("own_matrix", _I64P), ("own_stride", _I64P), ("own_bias", _I64P),
        ("sel_bias", _I64P),
        ("p_used", POINTER(c_double)),
        ("rank_hits", _I64P * MAX_LOOKAHEAD),
        ("scored", _I64P * MAX_LOOKAHEAD),
        ("per_layer", _I64P * MAX_LOOKAHEAD),
        ("by_threshold", _I64P * MAX_LOOKAHEAD),
        ("waiting", c_int64 * MAX_LOOKAHEAD),
        ("pend_order", POINTER(c_int32)),
        ("pend_p", POINTER(c_float)),
        ("pend_valid", POINTER(c_uint8)),
        ("pend_feat", POINTER(c_float)),
        ("feat_valid", POINTER(c_uint8)),
        ("feat_src", POINTER(c_int32)),
        ("samples", POINTER(c_float)),
        ("sample_pair", POINTER(c_int32)),
        ("sample_cap", c_int32), ("n_samples", c_int32),
        ("last_layer", c_int32),
        ("node_at", _I64P), ("logits_at", _I64P),
        ("x", POINTER(c_float)),
        ("work", POINTER(c_float)),
        ("seen", POINTER(c_uint8)),
        ("pf_layer", POINTER(c_int32)), ("pf_expert", POINTER(c_int32)),
        ("pf_prio", POINTER(c_double)),
        ("pf_n", c_int32),
        ("guesses", c_uint64), ("protected_leaves", c_uint64), ("skipped", c_uint64), ("unlocated", c_uint64),
        ("prefetched", c_uint64),
        ("tensor_get", c_void_p),
    ]


def _ptr(arr: np.ndarray, ctype: type) -> object:
    assert arr.flags.c_contiguous
    return arr.ctypes.data_as(POINTER(ctype))


class NativeSpeculation:
    """The C path of ``speculator``'s decode guesses, attached to ``gate``: :meth:`start` before
    a decoded token (where :meth:`ready`), :meth:`stop` before anything Python observes."""

    def __init__(self, speculator: Speculator, gate: Gate) -> None:
        if not 1 <= speculator.lookahead <= MAX_LOOKAHEAD or len(THRESHOLD_SWEEP) != _SWEEP:
            raise ValueError(f"native speculation guesses 1 to {MAX_LOOKAHEAD} layers ahead")
        lb = native.lib()
        native.check_sizeof(lb, "spec", ctypes.sizeof(_SpecStruct), "spec_native.py")
        lb.smoe_spec_reset.restype = None
        lb.smoe_spec_reset.argtypes = [c_void_p]
        self._lib = lb
        self.spec = speculator
        r = speculator.residency
        s = r.state
        L, E, A = r.n_layer, speculator.n_expert, speculator.lookahead
        R, G = speculator.max_rank, speculator.n_guess
        st = _SpecStruct()
        st.n_layer, st.n_expert, st.lookahead, st.n_guess, st.max_rank = L, E, A, G, R
        st.n_sweep = _SWEEP
        st.threshold = speculator.threshold
        for i, t in enumerate(THRESHOLD_SWEEP):
            st.sweep[i] = t
        st.n_src, st.search_depth = abi.GGML_MAX_SRC, SEARCH_DEPTH
        st.off_ne = abi.GgmlTensor.ne.offset  # type: ignore[attr-defined]
        st.off_nb = abi.GgmlTensor.nb.offset  # type: ignore[attr-defined]
        st.off_src = abi.GgmlTensor.src.offset  # type: ignore[attr-defined]
        st.off_name = abi.TENSOR_NAME_OFFSET
        st.max_leaf_cost = r.max_leaf_cost
        st.ledger = _ptr(r.ledger, c_int64)
        st.resident, st.protect = _ptr(s.resident, c_uint8), _ptr(s.protect, c_uint8)
        st.in_flight = _ptr(r.flight_table, c_uint8)
        # the tables (kept referenced here: C holds their addresses)
        self._target = np.full((L, A), -1, np.int32)
        self._matrix = np.zeros((L, A), np.int64)
        self._stride = np.zeros((L, A), np.int64)
        self._bias = np.zeros((L, A), np.int64)
        self._fit = np.zeros((L, A), np.int64)
        self._wanted = np.zeros((L, A), np.uint8)
        self._own_matrix = np.zeros(L, np.int64)
        self._own_stride = np.zeros(L, np.int64)
        self._own_bias = np.zeros(L, np.int64)
        self._sel_bias = np.zeros(L, np.int64)
        self.p_used = np.zeros((A, L, R), np.float64)
        self._keep: dict[object, object] = {}  # arrays whose addresses the tables hold
        self._fit_w: dict[tuple[int, int], object] = {}  # (L, T) -> the fit's weights the table holds
        self._pend_order = np.zeros((A, L, R), np.int32)
        self._pend_p = np.zeros((A, L, G), np.float32)
        self._pend_valid = np.zeros((A, L), np.uint8)
        self._pend_feat = np.zeros((A, L, 2 * E + 1), np.float32)
        self._feat_valid = np.zeros((A, L), np.uint8)
        self._feat_src = np.zeros((A, L), np.int32)
        cap = 4 * L * A  # samples of a few tokens: Python takes them before each token
        self._samples = np.zeros((cap, 3 * E + 1), np.float32)
        self._sample_pair = np.zeros((cap, 2), np.int32)
        self._node_at = np.zeros(L, np.int64)
        self._logits_at = np.zeros(L, np.int64)
        self._work = np.zeros(4 * E, np.float32)
        self._seen = np.zeros(E, np.uint8)
        self._pf_layer = np.zeros(A * G, np.int32)
        self._pf_expert = np.zeros(A * G, np.int32)
        self._pf_prio = np.zeros(A * G, np.float64)
        self._x = np.zeros(0, np.float32)
        st.target, st.matrix, st.stride = _ptr(self._target, c_int32), _ptr(self._matrix, c_int64), _ptr(self._stride, c_int64)
        st.bias, st.sel_bias = _ptr(self._bias, c_int64), _ptr(self._sel_bias, c_int64)
        st.fit, st.wanted = _ptr(self._fit, c_int64), _ptr(self._wanted, c_uint8)
        st.own_matrix, st.own_stride = _ptr(self._own_matrix, c_int64), _ptr(self._own_stride, c_int64)
        st.own_bias = _ptr(self._own_bias, c_int64)
        st.pend_feat, st.feat_valid = _ptr(self._pend_feat, c_float), _ptr(self._feat_valid, c_uint8)
        st.feat_src = _ptr(self._feat_src, c_int32)
        st.samples, st.sample_pair = _ptr(self._samples, c_float), _ptr(self._sample_pair, c_int32)
        st.sample_cap = cap
        st.p_used = _ptr(self.p_used, c_double)
        for a in range(A):
            ls = speculator.stats.lookahead[a + 1]
            st.rank_hits[a] = _ptr(ls.rank_hits, c_int64)
            st.scored[a] = _ptr(ls.scored, c_int64)
            st.per_layer[a] = _ptr(ls.per_layer, c_int64)
            st.by_threshold[a] = _ptr(ls.by_threshold, c_int64)
        st.pend_order, st.pend_p = _ptr(self._pend_order, c_int32), _ptr(self._pend_p, c_float)
        st.pend_valid = _ptr(self._pend_valid, c_uint8)
        st.last_layer = -1
        st.node_at, st.logits_at = _ptr(self._node_at, c_int64), _ptr(self._logits_at, c_int64)
        st.work, st.seen = _ptr(self._work, c_float), _ptr(self._seen, c_uint8)
        st.pf_layer, st.pf_expert = _ptr(self._pf_layer, c_int32), _ptr(self._pf_expert, c_int32)
        st.pf_prio = _ptr(self._pf_prio, c_double)
        st.tensor_get = native.function_address(abi.ggml_backend_tensor_get)
        self._st = st
        self._built = False
        self._scores_seen = -1  # Speculator.rescored the chances of use hold
        self.guessed = 0  # gates guessed in C
        gate.attach_spec(ctypes.addressof(st), self._on_prefetch)

    # ------------------------------------------------------------------ state

    def ready(self) -> bool:
        """Whether the speculator has what the C path needs: its routers, read at the first gate
        it observed (which norm feeds them is read from the graph)."""
        return self.spec.weights_loaded

    @property
    def guessing(self) -> bool:
        """Whether the C path guesses decoded tokens now (started, not stopped since)."""
        return bool(self._st.enabled)

    def start(self) -> None:
        """Refresh the tables from what the speculator knows now, and guess in C (gate thread,
        between decodes)."""
        if not self._built:
            self._build()
        self._refresh()
        if not self._st.enabled:
            self.spec.forget()  # the Python path's guesses and their protection
            self._lib.smoe_spec_reset(ctypes.addressof(self._st))
            self._st.enabled = 1

    def new_pass(self) -> bool:
        """Start a decoded token's pass over the layers before its first gate, as that gate would
        (the last pass's guesses and their protection dropped), so that leaves protected before
        it stay protected until their own gate (gate thread, between decodes). False, doing
        nothing, where the C path is not guessing."""
        if not self._st.enabled:
            return False
        self.spec.forget()  # the guesses' protection, as stop() drops it
        self._lib.smoe_spec_reset(ctypes.addressof(self._st))
        return True

    def stop(self) -> None:
        """Guess nothing in C (a prompt, which Python observes, or a pause): drop the guesses not
        scored yet and their protection, and take in the counts."""
        if self._st.enabled:
            self._st.enabled = 0
            self._lib.smoe_spec_reset(ctypes.addressof(self._st))
            self.spec.forget()
        self.take_counts()

    def take_counts(self) -> None:
        """Add the C path's counters to the speculator's stats, and its samples to the fits."""
        st, s = self._st, self.spec.stats
        self.guessed += st.guesses
        s.guesses += st.guesses
        s.protected += st.protected_leaves
        s.skipped += st.skipped
        s.prefetched += st.prefetched  # queued by the native pager
        st.guesses = st.protected_leaves = st.skipped = st.prefetched = 0
        self.take_samples()

    @property
    def unlocated(self) -> int:
        """Gates whose router input the C path did not find in the graph (not guessed)."""
        return int(self._st.unlocated)

    # ------------------------------------------------------------------ tables

    def _build(self) -> None:
        """The plain projections: per MoE layer (the last one included, whose own logits the fits'
        samples need), its own router's columns and each guessed layer's, in the speculator's one
        matrix per layer (their addresses, no copies)."""
        sp, st = self.spec, self._st
        E = sp.n_expert
        n_embd = 0
        for layer, targets in sp.ahead.items():
            proj = sp.projections(layer, targets)
            if proj is None:
                continue
            looks, matrix, bias = proj
            bias = np.ascontiguousarray(bias, np.float32)
            self._keep[layer] = (matrix, bias)
            n_embd, width = matrix.shape
            self._own_matrix[layer], self._own_stride[layer] = matrix.ctypes.data, width
            self._own_bias[layer] = bias.ctypes.data
            for i, (a, t) in enumerate(looks, 1):
                self._target[layer, a - 1] = t
                self._matrix[layer, a - 1] = matrix.ctypes.data + 4 * i * E
                self._stride[layer, a - 1] = width
                self._bias[layer, a - 1] = bias.ctypes.data + 4 * i * E
        st.n_embd = n_embd
        self._x = np.zeros(max(1, n_embd), np.float32)
        st.x = _ptr(self._x, c_float)
        st.sigmoid = 1 if sp.sigmoid else 0
        for t, sel in enumerate(sp.selection_bias):
            if sel is not None:
                arr = np.ascontiguousarray(sel, np.float32)
                self._keep[("sel", t)] = arr
                self._sel_bias[t] = arr.ctypes.data
        self._built = True

    def _refresh(self) -> None:
        """The fits' samples the C path took, into the fits; the fits' maps, the cost model's
        bars and the chances of use by rank, into the tables."""
        sp, st = self.spec, self._st
        self.take_samples()
        st.bar_free, st.bar_full = sp.residency.prefetch_bars()  # which one applies: the ledger, at each gate
        st.bar_ahead = sp.residency.ahead_cost()
        fits = sp.fit.fits
        for layer, slots in enumerate(self._target):
            for a, t in enumerate(slots.tolist()):
                if t < 0:
                    continue
                pair = (layer, t)
                self._wanted[layer, a] = 1 if sp.fit.wanted(pair) else 0
                fit = fits.get(pair)
                w = fit.weights() if isinstance(fit, PairFit) else None
                if self._fit_w.get(pair) is not w:
                    self._fit_w[pair] = w
                    arr = None if w is None else np.ascontiguousarray(w, np.float32)
                    self._keep[("fit", pair)] = arr
                    self._fit[layer, a] = 0 if arr is None else arr.ctypes.data
        for a in range(1, sp.lookahead + 1):
            if sp.rescore(a, int(st.waiting[a - 1])):
                st.waiting[a - 1] = 0
        if self._scores_seen != sp.rescored:  # the chances of use change only when rescored
            self._scores_seen = sp.rescored
            for a in range(1, sp.lookahead + 1):
                for t in sp.guessed_layers:
                    self.p_used[a - 1, t] = sp.p_used(a, t)

    def take_samples(self) -> None:
        """Hand the fits the samples the C path took: per pair, its features at the gated layer
        and the guessed layer's own logits, row for row."""
        st = self._st
        n = int(st.n_samples)
        if not n:
            return
        E, L = self.spec.n_expert, len(self._target)
        code = self._sample_pair[:n, 0].astype(np.int64) * L + self._sample_pair[:n, 1]
        order = np.argsort(code, kind="stable")  # by pair, each pair's rows in the order taken
        code, rows = code[order], self._samples[:n][order].astype(np.float64)
        cuts = [0, *(np.flatnonzero(code[1:] != code[:-1]) + 1).tolist(), n]
        for lo, hi in zip(cuts, cuts[1:]):
            self.spec.fit.add(divmod(int(code[lo]), L), rows[lo:hi, : 2 * E + 1], rows[lo:hi, 2 * E + 1 :])
        st.n_samples = 0

    # ------------------------------------------------------------------ the C path's prefetches

    def _on_prefetch(self, layer: int, ids: np.ndarray) -> None:
        st = self._st
        n = int(st.pf_n)
        keys = list(zip(self._pf_layer[:n].tolist(), self._pf_expert[:n].tolist()))
        self.spec.stats.prefetched += self.spec.residency.prefetch(
            keys, layer=layer, in_use=ids[0].tolist(), priority=self._pf_prio[:n].tolist(), source="speculation")
