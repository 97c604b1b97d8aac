"""Eviction policies over leaves, as pure functions of the access state.

The access state is a few arrays indexed by (layer, expert): which leaves are resident, the
clock of each leaf's last use and how often it was used. The gate's C hot path stamps them on
hits, the residency on misses, and a trace replay in Python the same way, so a policy makes
the same choice live and in replay. The clock advances once per gate (one layer of one
micro-batch), so layer order is visible in it.

Policies:

``lru``
    evict the leaf used longest ago.
``lfru`` (the default: :data:`DEFAULT_POLICY`)
    frequency-weighted LRU (LRFU): a leaf's score is the sum over its uses of
    ``0.5 ** (age of the use / half-life)``, half-life :data:`LFRU_HALF_LIFE` passes over the
    layers; evict the lowest score. A leaf used often survives a burst of one-off leaves that
    plain LRU would keep, and a burst of uses long ago fades. The score is kept as
    :attr:`AccessState.freq`, the sum as of the last use, and decayed to now when compared.
    In a gate of several tokens (a prompt's micro-batch), each token after the first that picks
    a leaf adds :data:`TOKEN_WEIGHT` more: the experts a prompt leans on are likely to serve
    its continuation.
    Chosen over the others by replaying traces of sampled text (``smoe-gguf replay``, held-out
    prompts). While a prompt is gated in micro-batches of several tokens
    (:attr:`AccessState.scan`), least-stale's order instead:
    a prompt's micro-batches pass over the layers in turn, a scan in which the leaf used longest
    ago is of the layer the next micro-batch reaches soonest, and the leaf just used is needed
    last.
``least-stale``
    evict the leaf whose layer comes furthest in the future in layer order: after layer
    ``c``, layer ``c+1`` is needed next and layer ``c`` last. Among leaves of that layer,
    LRU. (SpecMD's observation: a leaf just used by its layer is the least urgent one.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import SmoeError

DEFAULT_POLICY = "lfru"
LFRU_HALF_LIFE = 32.0  # passes over the layers (n_layer gates each); measured live (docs/prediction.md)
TOKEN_WEIGHT = 0.25  # lfru: added per token beyond the first that picks a leaf in one gate (replay, docs/prediction.md)


@dataclass
class AccessState:
    """What policies look at. Arrays are ``[n_layer, n_expert]``; C writes into them in place."""

    n_layer: int
    n_expert: int
    resident: np.ndarray  # uint8: 1 when the leaf is in the X-Slot
    last_use: np.ndarray  # uint64: clock of the leaf's last use (0: never)
    uses: np.ndarray  # uint32: gates that selected the leaf
    freq: np.ndarray  # float64: lfru's score as of the leaf's last use (see record)
    clock: np.ndarray  # uint64[1]: +1 per gate
    pinned: np.ndarray  # uint8: never evicted (--pin)
    node_wanted: np.ndarray  # uint8 [n_layer]: the gate stops at the layer's down node (parts in flight)
    protect: np.ndarray  # uint8: predicted for the next layers; kept while other leaves can go
    half_life: float  # of lfru's score, in gates
    token_weight: float  # of lfru's score, per token beyond the first in a gate (TOKEN_WEIGHT)
    scan: np.ndarray  # uint8[1]: 1 while a prompt is gated in micro-batches of several tokens

    @classmethod
    def new(cls, n_layer: int, n_expert: int) -> "AccessState":
        shape = (n_layer, n_expert)
        return cls(
            n_layer, n_expert,
            np.zeros(shape, np.uint8), np.zeros(shape, np.uint64), np.zeros(shape, np.uint32),
            np.zeros(shape, np.float64), np.zeros(1, np.uint64), np.zeros(shape, np.uint8),
            np.zeros(n_layer, np.uint8), np.zeros(shape, np.uint8), LFRU_HALF_LIFE * n_layer,
            TOKEN_WEIGHT, np.zeros(1, np.uint8),
        )

    def tick(self) -> int:
        self.clock[0] += 1
        return int(self.clock[0])

    def decayed(self, index: Any, now: float) -> np.ndarray:
        """lfru's score of the leaves at ``index`` (into the ``[n_layer, n_expert]`` arrays) at
        clock ``now``: :attr:`freq` decayed since their last use (``smoe_lfru_at`` in C)."""
        age = (now - self.last_use[index].astype(np.float64)) / self.half_life
        return self.freq[index] * np.exp2(-age)

    def record(self, layer: int, experts: list[int], now: int, picks: np.ndarray | None = None) -> None:
        """Stamp ``experts`` of ``layer`` as used at ``now`` (once per gate), ``picks[i]`` tokens
        of the gate having picked ``experts[i]`` (None: one each): the C gate's hit path and the
        native pager stamp the same way (``smoe_stamp_use``, then :attr:`token_weight` a token)."""
        score = self.decayed((layer, experts), now) + 1.0
        if picks is not None:
            score += self.token_weight * (picks - 1)
        self.freq[layer, experts] = score
        self.last_use[layer, experts] = now
        self.uses[layer, experts] += 1


class Policy:
    """Chooses which resident leaf to evict. ``victim`` gets a mask of leaves it may evict."""

    name = "?"

    def victim(self, s: AccessState, evictable: np.ndarray, layer: int) -> tuple[int, int] | None:
        """The leaf to evict among ``evictable`` (bool ``[n_layer, n_expert]``), or None if none is.

        ``layer`` is the layer being gated now.
        """
        flat = np.flatnonzero(evictable)
        if flat.size == 0:
            return None
        k = int(flat[self._pick(s, flat, layer)])
        return divmod(k, s.n_expert)

    def _pick(self, s: AccessState, flat: np.ndarray, layer: int) -> int:
        raise NotImplementedError


class LRU(Policy):
    name = "lru"

    def _pick(self, s: AccessState, flat: np.ndarray, layer: int) -> int:
        return int(np.argmin(s.last_use.ravel()[flat]))


class LFRU(Policy):
    name = "lfru"

    def _pick(self, s: AccessState, flat: np.ndarray, layer: int) -> int:
        if s.scan[0]:
            return _layer_order(s, flat, layer)
        score = s.decayed(np.divmod(flat, s.n_expert), float(s.clock[0]))
        # ties (e.g. never-used leaves): least recently used first
        order = np.lexsort((s.last_use.ravel()[flat], score))
        return int(order[0])


class LeastStale(Policy):
    name = "least-stale"

    def _pick(self, s: AccessState, flat: np.ndarray, layer: int) -> int:
        return _layer_order(s, flat, layer)


def _layer_order(s: AccessState, flat: np.ndarray, layer: int) -> int:
    """least-stale's pick: the leaf of the layer gated last from ``layer`` on, LRU among them."""
    layers = flat // s.n_expert
    # distance in layer order until the leaf's layer is gated again: layer+1 -> 0 ... layer -> L-1
    until = (layers - layer - 1) % s.n_layer
    order = np.lexsort((s.last_use.ravel()[flat], -until))
    return int(order[0])


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (LRU, LFRU, LeastStale)}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise SmoeError(f"unknown policy {name!r}: choose one of {', '.join(POLICIES)}", 2) from None
