"""The first MoE layer of a decoded token, guessed from the token itself before it is decoded.

Speculation guesses a layer from an earlier layer's router input, so a token's first MoE layer is
never guessed: nothing of the token is computed before it. Its router input is the token's
embedding row plus what the layers before it add (attention, any dense layer), and the embedding
alone ranks most of the same experts first. So before each decoded token (gate thread, before
``llama_decode``):

- the token's embedding row is read from llama.cpp's own ``token_embd.weight`` (found in the graph
  by the speculator, see :attr:`Speculator.embedding`), normalised as the first MoE layer's router
  input is (``rms_norm(e) * w``), and ranked by that router as it ranks its input (one row per
  token, kept: a token seen again costs nothing);
- the guesses whose chance of use reaches the cost model's bar
  (:meth:`~smoe_gguf.residency.Residency.prefetch_bar`) are prefetched, most likely first.

After the token, every guess is scored against what the first MoE layer picked (the leaves its
gate stamped), per rank; that count, behind a prior, is each rank's chance of use. Scoring does
not depend on what was prefetched, so a rank whose chance is below the bar is still counted and
starts to be read once it is worth it. Only leaves move: what the experts compute is unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from . import ggml_abi as abi
from .speculate import PRIOR_WEIGHT, Speculator, rank_prior

SOURCE = "token"  # the asker's name in the residency's prefetch counts


class TokenGuess:
    """Guess a decoded token's first MoE layer from its embedding, and score the guess:
    :meth:`guess` before each decoded token (the engine prefetches what it returns), then
    :meth:`take_pending` and :meth:`score` once its gates have run."""

    def __init__(self, speculator: Speculator) -> None:
        self.spec = speculator
        r = speculator.residency
        self.residency = r
        self.layer = min(r.costs)  # the first layer with paged experts
        self.n_used = speculator.n_used
        self.max_rank = speculator.max_rank
        self.hits = np.zeros(self.max_rank, np.int64)  # per rank: guesses the layer picked
        self._prior = rank_prior(self.max_rank, self.n_used)
        self.scored = 0  # tokens whose guess was scored
        self._shape: tuple[int, int, int, int] | None = None  # the embedding's rows, width, row bytes, type
        self._ranked: np.ndarray | None = None  # [n_vocab, max_rank] experts by rank (-1: not yet)
        self._row = np.empty(0, np.uint8)
        self._pending: tuple[np.ndarray, int] | None = None  # (ranked experts, clock before the token)

    # ------------------------------------------------------------------ per token

    def guess(self, token: int) -> tuple[list[tuple[int, int]], list[float]]:
        """Rank ``token``'s guess (gate thread, before the token is decoded; it stays pending),
        and return the leaves not resident whose chance of use pays for the read, most likely
        first, with those chances (the engine queues them with the memo's, in one call)."""
        self._pending = None
        order = self._order(token)
        if order is None:
            return [], []
        r = self.residency
        self._pending = (order, int(r.state.clock[0]))
        p = self.p_used()
        ranks = np.flatnonzero((p >= r.prefetch_bar()) & (r.state.resident[self.layer, order] == 0))
        return [(self.layer, e) for e in order[ranks].tolist()], p[ranks].tolist()

    def take_pending(self) -> tuple[np.ndarray, int] | None:
        """The last guess, not scored yet (None if there is none); it is no longer pending."""
        pending, self._pending = self._pending, None
        return pending

    def score(self, pending: tuple[np.ndarray, int]) -> None:
        """Score a guess taken by :meth:`take_pending` against the experts the first MoE layer
        picked (the leaves its gate, the token's first, stamped as used), once its token's gates
        have run and before the next token's do."""
        order, clock = pending
        s = self.residency.state
        if int(s.clock[0]) <= clock:
            return  # no gate ran (nothing is paged now)
        self.hits += s.last_use[self.layer, order] == clock + 1
        self.scored += 1

    def p_used(self) -> np.ndarray:
        """Per rank, the chance that the first layer picks the guess of that rank: the counts
        behind speculation's prior (PRIOR_WEIGHT observations of :func:`rank_prior`)."""
        return (self.hits + PRIOR_WEIGHT * self._prior) / (self.scored + PRIOR_WEIGHT)

    # ------------------------------------------------------------------ the ranking

    def _order(self, token: int) -> np.ndarray | None:
        """The first layer's experts in the order its router ranks ``token``'s embedding; None
        until the speculator has found the embedding and read its routers."""
        sp = self.spec
        addr = sp.embedding
        if addr is None or not sp.weights_loaded:
            return None
        if self._shape is None:
            t = abi.tensor_at(addr)
            self._shape = (int(t.ne[1]), int(t.ne[0]), int(t.nb[1]), int(t.type))
        n_vocab, n_embd, row_bytes, ggml_type = self._shape
        if not 0 <= token < n_vocab:
            return None
        if self._ranked is None:
            self._ranked = np.full((n_vocab, self.max_rank), -1, np.int32)
        row = self._ranked[token]
        if row[0] < 0:
            h = self._embedding_row(addr, token, n_embd, row_bytes, ggml_type)
            ranked = None if h is None else sp.rank_input(self.layer, h)
            if ranked is None:
                return None
            row[:] = ranked
        return row

    def _embedding_row(self, addr: int, token: int, n_embd: int, row_bytes: int, ggml_type: int) -> np.ndarray | None:
        """Row ``token`` of the embedding tensor at ``addr``, dequantized to float32."""
        try:
            qtype = GGMLQuantizationType(ggml_type)
        except ValueError:
            return None
        if self._row.size < row_bytes:
            self._row = np.empty(row_bytes, np.uint8)
        abi.ggml_backend_tensor_get(addr, self._row.ctypes.data, token * row_bytes, row_bytes)
        try:
            values = np.asarray(dequantize(self._row[None, :row_bytes], qtype), np.float32).reshape(-1)
        except NotImplementedError:  # a type gguf's Python cannot dequantize: no guess
            return None
        if values.size < n_embd:
            return None
        return values[:n_embd]

    # ------------------------------------------------------------------ report

    def summary(self) -> dict[str, Any]:
        """Over the scored tokens: the recall of the top-k guess (k guesses for k picks, so its
        precision too), the chance of use by rank, and what the prefetches saved."""
        k = self.n_used
        hit_k = int(self.hits[:k].sum())
        n = self.scored * k
        src = self.residency.stats.by_source.get(SOURCE)
        return {
            "layer": self.layer,
            "tokens": self.scored,
            "recall": round(hit_k / n, 4) if n else 0.0,
            "p_used": [round(float(p), 3) for p in self.p_used()],
            "prefetch": src.as_dict() if src is not None else None,
        }
