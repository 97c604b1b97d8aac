"""Next-layer speculation: guess layer L+1's experts from layer L's router input, and prefetch them.

At the top-k gate of layer L the graph has computed the router input of L,
``x_L = rms_norm(h_L) * w_L`` (``w_L`` the layer's FFN norm weight; the node is the second
source of ``ffn_moe_logits-L``). Layer L+1's router sees ``rms_norm(h_L + attn_L+1(...)) * w_L+1``
(plus L's MoE output). Dropping the terms not yet computed, the guess is

    logits_L+1 ~= R_L+1 @ (x_L * w_L+1 / w_L) (+ the router bias, where the architecture has one)

so the speculator holds, per layer, ``R_L+1`` with the norm ratio folded in (dequantized once
from the core, beside it: ``n_layer x n_expert x n_embd`` float32). Experts whose guessed
router probability reaches ``threshold`` are handed to the residency's I/O thread, most likely
first; the gate of L+1 then finds them resident, or arriving.

Speculation only moves leaves: what the experts compute, and so every logit, is unchanged.
Precision (prefetched leaves the router then picked) and recall (picked leaves that were
guessed) are counted per layer for single-token gates (decode), at several thresholds at once,
so the threshold can be tuned on a real run (``--json`` shows the sweep).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from . import ggml_abi as abi
from .errors import SmoeError
from .residency import Residency

NODE_LOGITS = "ffn_moe_logits-"
SWEEP = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)
DEFAULT_THRESHOLD = 0.05
# Graph nodes between a layer's top-k and its router logits: 4 for plain top-k, 8 with expert
# groups (deepseek2: the group top-k and its mask sit in between).
SEARCH_DEPTH = 8


@dataclass
class SpecStats:
    guesses: int = 0  # single-token gates at which L+1 was guessed
    prefetched: int = 0  # leaves handed to the I/O thread
    # per threshold: [true positives, guessed, actual]; per layer at the chosen threshold
    sweep: dict[float, list[int]] = field(default_factory=lambda: {t: [0, 0, 0] for t in SWEEP})
    per_layer: dict[int, list[int]] = field(default_factory=dict)

    def precision_recall(self, counts: list[int]) -> tuple[float, float]:
        tp, guessed, actual = counts
        return tp / max(1, guessed), tp / max(1, actual)

    def summary(self, threshold: float) -> dict[str, object]:
        total = [0, 0, 0]
        for c in self.per_layer.values():
            total = [a + b for a, b in zip(total, c)]
        p, r = self.precision_recall(total)
        return {
            "threshold": threshold,
            "guesses": self.guesses,
            "prefetched": self.prefetched,
            "precision": round(p, 4),
            "recall": round(r, 4),
            "per_layer": {layer: dict(zip(("precision", "recall"), map(lambda v: round(v, 4), self.precision_recall(c))))
                          for layer, c in sorted(self.per_layer.items())},
            "sweep": {str(t): dict(zip(("precision", "recall"), map(lambda v: round(v, 4), self.precision_recall(c))))
                      for t, c in self.sweep.items()},
        }


class Speculator:
    """A gate observer (:meth:`smoe_gguf.gate.Gate.observe`) that prefetches layer L+1's guess."""

    def __init__(self, core: Path, residency: Residency, n_expert_used: int,
                 threshold: float = DEFAULT_THRESHOLD) -> None:
        self.residency = residency
        self.n_used = n_expert_used
        self.threshold = threshold
        self.stats = SpecStats()
        self._router: list[np.ndarray | None] | None = None  # per layer L+1: [n_expert, n_embd] (ratio folded)
        self._bias: list[np.ndarray | None] = []
        self._pending: dict[int, np.ndarray] = {}  # layer -> guessed probabilities (single-token gate)
        self._buf = np.empty(0, np.float32)
        # Read at start-up, not at the first decoded token (where it cost ~0.3 s): the routers
        # and every per-layer norm (which norm feeds the router is read from the graph later).
        self._tensors: dict[str, np.ndarray] = {}
        for t in GGUFReader(core).tensors:
            if t.name.startswith("blk.") and ("ffn_gate_inp." in t.name or "norm" in t.name):
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                self._tensors[t.name] = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(shape)

    # ------------------------------------------------------------------ weights (once)

    def _load_weights(self, norm_suffix: str) -> None:
        n_layer = self.residency.n_layer
        tensors = self._tensors
        router: list[np.ndarray | None] = [None] * n_layer
        bias: list[np.ndarray | None] = [None] * n_layer
        for layer in range(1, n_layer):
            r = tensors.get(f"blk.{layer}.ffn_gate_inp.weight")
            w_next = tensors.get(f"blk.{layer}.{norm_suffix}")
            w_here = tensors.get(f"blk.{layer - 1}.{norm_suffix}")
            if r is None or w_next is None or w_here is None:
                continue  # a dense layer (or one without a router): nothing to guess
            ratio = np.divide(w_next, w_here, out=np.zeros_like(w_next), where=w_here != 0)
            router[layer] = np.ascontiguousarray(r * ratio[None, :], np.float32)
            bias[layer] = tensors.get(f"blk.{layer}.ffn_gate_inp.bias")
        self._router, self._bias = router, bias

    # ------------------------------------------------------------------ the observer

    def forget(self) -> None:
        """Drop guesses not yet scored (the gate skipped observers for a while)."""
        self._pending.clear()

    def __call__(self, layer: int, node: int, ids: np.ndarray) -> None:
        single = ids.shape[0] == 1
        guessed = self._pending.pop(layer, None)
        if guessed is not None and single:
            self._score(layer, guessed, set(ids[0].tolist()))
        nxt = layer + 1
        if nxt >= self.residency.n_layer or not single:
            return  # prompt micro-batches select most experts anyway: the gate loads them
        x = self._router_input(node, layer)
        if x is None or self._router is None or self._router[nxt] is None:
            return
        logits = self._router[nxt] @ x
        b = self._bias[nxt]
        if b is not None:
            logits = logits + b
        p = np.exp(logits - logits.max())
        p /= p.sum()
        self._pending[nxt] = p
        self.stats.guesses += 1
        top = np.argsort(-p)[: 2 * self.n_used]
        keys = [(nxt, int(e)) for e in top[p[top] >= self.threshold]]
        if keys:
            self.stats.prefetched += self.residency.prefetch(keys, layer=layer, in_use=np.unique(ids).tolist())

    def _score(self, layer: int, p: np.ndarray, actual: set[int]) -> None:
        top = np.argsort(-p)[: 2 * self.n_used]
        ptop = p[top]
        hit = np.isin(top, list(actual))
        thresholds = np.array([*self.stats.sweep, self.threshold])
        sel = ptop[None, :] >= thresholds[:, None]  # [threshold, guess]
        tp, guessed = (sel & hit).sum(axis=1).tolist(), sel.sum(axis=1).tolist()
        counts = [*self.stats.sweep.values(), self.stats.per_layer.setdefault(layer, [0, 0, 0])]
        for c, a, b in zip(counts, tp, guessed):
            c[0] += a
            c[1] += b
            c[2] += len(actual)

    def _router_input(self, node: int, layer: int) -> np.ndarray | None:
        """``x_L`` of the (single) token: the second source of ``ffn_moe_logits-L``, found by
        walking up from the top-k node; loads the router weights the first time."""
        logits = _find_up(node, f"{NODE_LOGITS}{layer}".encode(), depth=SEARCH_DEPTH)
        if logits is None:
            return None
        x_addr = abi.tensor_at(logits).src[1]
        xt = abi.tensor_at(x_addr)
        if self._router is None:
            norm = xt.src[1] if xt.src[1] else None
            name = abi.tensor_at(norm).name.decode() if norm else ""
            prefix = f"blk.{layer}."
            if not name.startswith(prefix):
                raise SmoeError(f"speculation: the router input of layer {layer} is not a norm ({name!r})")
            self._load_weights(name[len(prefix):])
        n_embd = int(xt.ne[0])
        if xt.type != 0 or int(xt.nb[0]) != 4:  # F32, contiguous rows: what llama.cpp builds
            return None
        if self._buf.size != n_embd:
            self._buf = np.empty(n_embd, np.float32)
        abi.ggml_backend_tensor_get(x_addr, self._buf.ctypes.data, 0, n_embd * 4)
        return self._buf


def _find_up(address: int, name: bytes, depth: int) -> int | None:
    """The first tensor named ``name`` among the sources of ``address``, breadth first."""
    frontier, seen = [address], {address}
    for _ in range(depth + 1):
        nxt: list[int] = []
        for a in frontier:
            t = abi.tensor_at(a)
            if t.name == name:
                return a
            for s in t.src:
                if s and s not in seen:
                    seen.add(s)
                    nxt.append(s)
        frontier = nxt
    return None

