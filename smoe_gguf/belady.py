"""Belady's MIN over a known sequence of gates: the offline optimum that replay compares against.

MIN evicts the leaf whose next use lies furthest in the future (a leaf never used again first).
It needs the whole future, so it exists only in trace replay (:func:`smoe_gguf.replay.replay`),
never among the online policies of :mod:`smoe_gguf.policy`. It plugs into the same
:class:`~smoe_gguf.residency.Residency` as they do, so it sees the same in-use protection (the
leaves of the gate being served are never evicted) and the same micro-batch re-cut.

With every leaf charged the same bytes (true of every model here: the experts of all MoE layers
have one shape), no demand pager evicting under the same protection misses fewer leaves over the
same sequence of gates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .policy import AccessState, Policy


class Belady(Policy):
    """MIN over ``gates``: ``(layer, experts)`` in the order the residency is asked for them.

    The residency's clock ticks once per gate, so at clock ``t`` gate ``t - 1`` is being served;
    the next-use table is brought up to that gate lazily, when a victim is asked for.
    """

    name = "belady"

    def __init__(self, gates: Sequence[tuple[int, Sequence[int]]], n_layer: int, n_expert: int) -> None:
        self._gates = [(int(layer), np.unique(np.asarray(es, np.int64))) for layer, es in gates]
        never = len(self._gates)  # "not used again": later than any gate
        upcoming: dict[tuple[int, int], int] = {}
        self._after: list[np.ndarray] = [np.empty(0, np.int64)] * len(self._gates)
        for i in range(len(self._gates) - 1, -1, -1):
            layer, es = self._gates[i]
            self._after[i] = np.array([upcoming.get((layer, int(e)), never) for e in es], np.int64)
            for e in es:
                upcoming[(layer, int(e))] = i
        self.next_use = np.full((n_layer, n_expert), never, np.int64)  # as of the gate being served
        for (layer, e), i in upcoming.items():
            self.next_use[layer, e] = i
        self._applied = 0  # gates whose uses next_use has moved past

    def _advance(self, gate: int) -> None:
        while self._applied < min(gate, len(self._gates)):
            layer, es = self._gates[self._applied]
            self.next_use[layer, es] = self._after[self._applied]
            self._applied += 1

    def _pick(self, s: AccessState, flat: np.ndarray, layer: int) -> int:
        self._advance(int(s.clock[0]) - 1)
        return int(np.argmax(self.next_use.ravel()[flat]))
