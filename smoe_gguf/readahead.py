"""Prompt read-ahead: while a prompt micro-batch computes layer L, layer L+1's leaves stream in.

A micro-batch of ``n`` tokens with top-``k`` routing over ``E`` experts selects nearly every
expert of a layer once ``n * k`` reaches about twice ``E``. At its top-k gate of layer L, the
leaves of the next MoE layer that are not resident are handed to the I/O threads, so the disk
and the matmuls of layer L work at the same time. Leaves of layer L that the node reads are
never evicted for them. The last MoE layer is not read ahead: it computes only the tokens whose
logits are wanted. The engine uses this where speculation is off; speculation
(:mod:`smoe_gguf.speculate`) reads only the next layer's leaves the micro-batch is guessed to select.
"""

from __future__ import annotations

import numpy as np

from .residency import Residency


def layer_covering_tokens(n_expert: int, n_expert_used: int) -> int:
    """The fewest tokens of a micro-batch whose selections, ``n * k``, reach twice a layer's
    experts: from there a micro-batch selects nearly every expert of a layer."""
    return -(-2 * n_expert // max(1, n_expert_used))


class PromptReadAhead:
    """A gate observer (:meth:`smoe_gguf.gate.Gate.observe`) for multi-token micro-batches."""

    def __init__(self, residency: Residency, n_expert: int, n_expert_used: int) -> None:
        self.residency = residency
        self.n_expert = n_expert
        self.n_used = n_expert_used
        self.min_tokens = layer_covering_tokens(n_expert, n_expert_used)
        layers = sorted(residency.costs)
        self._next = {a: b for a, b in zip(layers, layers[1:])}  # MoE layer -> the next one
        self._last = layers[-1]
        self.queued = 0  # leaves handed to the I/O threads

    def __call__(self, layer: int, node: int, ids: np.ndarray) -> None:
        if ids.ndim < 2 or ids.shape[0] < self.min_tokens:
            return
        nxt = self._next.get(layer)
        if nxt is None or nxt == self._last:
            return
        resident = self.residency.state.resident[nxt]
        keys = [(nxt, e) for e in range(self.n_expert) if not resident[e]]
        if keys:
            # the chance that a micro-batch of n tokens selects a given expert
            p = 1.0 - (1.0 - min(1.0, self.n_used / self.n_expert)) ** ids.shape[0]
            self.queued += self.residency.prefetch(keys, layer=layer, in_use=np.unique(ids).tolist(),
                                                   priority=p, source="read-ahead")
