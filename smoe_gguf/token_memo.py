"""A decoded token's later MoE layers, guessed from what they picked when the same token came before.

Speculation guesses a layer from the layer before it, so its reads have one layer's compute to
land in. A token's routing depends much on the token itself, and most tokens come back, so the
experts each layer picked the last times a token was decoded are a guess of every layer at once,
available as soon as the token is sampled. Before each decoded token (gate thread, before
``llama_decode``; its reads are queued after :class:`~smoe_gguf.token_guess.TokenGuess`'s first
layer's, in the same call: ``Engine._advance``):

- each later paged layer's experts are ranked by how often they were picked in the token's last
  :data:`KEEP` decodes (the latest decode breaking ties);
- each rank's chance of use (per layer, counted below, behind speculation's prior) is set against
  the cost model's bar (:meth:`~smoe_gguf.residency.Residency.prefetch_bar`; beyond the next
  layer also :meth:`~smoe_gguf.residency.Residency.ahead_cost`, as speculation's lookahead is):
  guesses above it are protected from eviction until their gate is served (or speculation guesses
  that layer again), and those not resident are prefetched, the nearer layer first.

After the token, each layer's picks are read from the gates' use counts (``state.uses``), every
guess is scored against them, rank by rank, whatever was prefetched, and they are kept for the
token's next decode. Only leaves move: what the experts compute is unchanged. These per-token
steps run in C (``_memo.c``) on this class's arrays; the memo itself and its file stay here.

The memo and its counts are kept beside the profile (``PROFILE.memo.npz``, :func:`save_memo`): a
session starts from what earlier ones decoded and, unless ``--no-learn``, adds its own at close
(a token's latest picks first; earlier sessions' counts weighted by :data:`DECAY`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from ctypes import c_double, c_int32, c_void_p
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import native
from .safeio import locked
from .sidecar import Sidecar
from .speculate import PRIOR_WEIGHT, rank_prior

if TYPE_CHECKING:
    from .residency import Residency
    from .spec_native import NativeSpeculation

SOURCE = "memo"  # the asker's name in the residency's prefetch counts
KEEP = 4  # decodes of a token whose picks are kept
MAX_TOKENS = 1 << 13  # distinct tokens kept (a 48-layer top-8 model: 3 KiB each); the least recently decoded goes first
MEMO = Sidecar(".memo.npz", "smoe-memo-1", "token memo", "memo", plural=False)  # the file beside the profile
DECAY = 0.9  # weight kept by earlier sessions' counts at each save
_LIB: ctypes.PyDLL | None = None


def _lib() -> ctypes.PyDLL:
    """The memo's per-token steps (``_memo.c``), in the gate's library; they keep the GIL."""
    global _LIB
    if _LIB is None:
        lb = native.quick()
        lb.smoe_memo_orders.restype = None
        lb.smoe_memo_orders.argtypes = [c_void_p, c_int32, c_int32, c_int32, c_int32, c_int32, c_void_p, c_void_p]
        lb.smoe_memo_select.restype = c_int32
        lb.smoe_memo_select.argtypes = [c_void_p, c_int32, c_int32, c_int32, c_void_p, c_void_p, c_double, c_double,
                                        c_void_p, c_void_p, c_void_p, c_void_p, c_void_p]
        lb.smoe_memo_score.restype = c_int32
        lb.smoe_memo_score.argtypes = [c_void_p, c_void_p, c_void_p, c_int32, c_int32, c_int32, c_void_p, c_int32,
                                       c_void_p, c_void_p, c_void_p]
        lb.smoe_memo_push.restype = None
        lb.smoe_memo_push.argtypes = [c_void_p, c_int32, c_int32, c_int32, c_void_p]
        _LIB = lb
    return _LIB


class TokenMemo:
    """Guess a decoded token's later MoE layers from its earlier decodes, protect what pays, score
    the guess and keep the picks: :meth:`guess` before each decoded token (the engine prefetches
    what it returns), then :meth:`take_pending` and :meth:`score` once its gates have run."""

    def __init__(self, residency: Residency, n_used: int, native: NativeSpeculation | None = None) -> None:
        self.residency = residency
        self.native = native
        layers = sorted(residency.costs)
        self.layers = np.asarray(layers, np.int64)  # every paged layer, the first included (it is kept)
        self.n_expert = int(residency.state.resident.shape[1])
        self.n_used = n_used
        self.max_rank = 2 * n_used
        n = len(layers)
        self.hits = np.zeros((n, self.max_rank), np.int64)  # per layer and rank: guesses the layer picked
        self.scored = np.zeros((n, self.max_rank), np.int64)  # ... guesses made
        self._prior = rank_prior(self.max_rank, n_used)
        self.tokens = 0  # decoded tokens whose picks were read
        self.guessed = 0  # ... that had earlier decodes to guess from
        self._memo: dict[int, np.ndarray] = {}  # token -> [KEEP, layers, n_used] picks, latest first (-1: none)
        self._learnt: set[int] = set()  # tokens decoded in this session (what a save adds)
        self._base = (np.zeros_like(self.hits), np.zeros_like(self.scored))  # the counts loaded
        self._pending: tuple[int, np.ndarray | None, np.ndarray] | None = None  # (token, orders, uses before)
        self._index = {int(layer): i for i, layer in enumerate(layers)}
        self._prompt: tuple[list[int], dict[int, list[np.ndarray]]] | None = None  # its tokens, picks per layer
        # the C steps' buffers: a token's picks, a guess's leaves (layer, expert, chance), a ranking's counts
        self._row = np.full((n, n_used), -1, np.int16)
        cap = max(1, n * self.max_rank)
        self._out = (np.empty(cap, np.int32), np.empty(cap, np.int32), np.empty(cap, np.float64))
        self._work = np.zeros(self.n_expert, np.int32)

    # ------------------------------------------------------------------ per token

    def guess(self, token: int) -> tuple[list[tuple[int, int]], list[float]]:
        """Rank ``token``'s guess for each later layer (gate thread, before the token is decoded;
        it stays pending), protect what pays, and return what of it is not resident and pays for
        the read, the nearer layer first and by rank within a layer, with the chances of use (the
        engine queues them with the first layer's, in one call)."""
        r = self.residency
        s = r.state
        orders = self._orders(token)
        self._pending = (token, orders, s.uses[self.layers])
        if orders is None or len(self.layers) < 2:
            return [], []
        protect = self.native is not None and self.native.new_pass()
        out_l, out_e, out_p = self._out
        p = self.p_used()
        n = _lib().smoe_memo_select(
            orders.ctypes.data, len(self.layers), self.max_rank, self.n_expert, self.layers.ctypes.data, p.ctypes.data,
            r.prefetch_bar(), r.ahead_cost(), s.resident.ctypes.data, s.protect.ctypes.data if protect else None,
            out_l.ctypes.data, out_e.ctypes.data, out_p.ctypes.data)
        return list(zip(out_l[:n].tolist(), out_e[:n].tolist(), strict=True)), out_p[:n].tolist()

    def take_pending(self) -> tuple[int, np.ndarray | None, np.ndarray] | None:
        """The last guess, not scored yet (None if there is none); it is no longer pending."""
        pending, self._pending = self._pending, None
        return pending

    def score(self, pending: tuple[int, np.ndarray | None, np.ndarray]) -> None:
        """Read what each layer picked for a guess taken by :meth:`take_pending` (the gates' use
        counts since :meth:`guess`), score the guess against it and keep it for the token's next
        decode, once its token's gates have run and before the next token's do."""
        token, orders, uses0 = pending
        s = self.residency.state
        gated = _lib().smoe_memo_score(
            s.uses.ctypes.data, uses0.ctypes.data, self.layers.ctypes.data, len(self.layers), self.n_expert,
            self.n_used, None if orders is None else orders.ctypes.data, self.max_rank, self.hits.ctypes.data,
            self.scored.ctypes.data, self._row.ctypes.data)
        if not gated:
            return  # no gate ran (nothing is paged now)
        self.tokens += 1
        if orders is not None:
            self.guessed += 1
        self._keep_row(token, self._row)

    def p_used(self) -> np.ndarray:
        """Per layer and rank, the chance that the layer picks the guess of that rank: the counts
        behind speculation's prior (PRIOR_WEIGHT observations of :func:`rank_prior`)."""
        return (self.hits + PRIOR_WEIGHT * self._prior) / (self.scored + PRIOR_WEIGHT)

    # ------------------------------------------------------------------ the memo

    def _orders(self, token: int) -> np.ndarray | None:
        """Per paged layer, its experts by how often the token's kept decodes picked them (the
        latest decode counting once more, the lower expert first on ties), ``max_rank`` of them
        (-1: fewer were picked); None for a token not decoded before."""
        kept = self._memo.get(token)
        if kept is None:
            return None
        order = np.empty((len(self.layers), self.max_rank), np.int32)
        _lib().smoe_memo_orders(kept.ctypes.data, KEEP, len(self.layers), self.n_used, self.n_expert, self.max_rank,
                                order.ctypes.data, self._work.ctypes.data)
        return order

    def _keep_row(self, token: int, row: np.ndarray) -> None:
        """Keep ``row`` ([layers, n_used], -1 for a layer not gated, which keeps what it had) as
        ``token``'s latest decode."""
        kept = self._memo.pop(token, None)  # re-inserted last: the dict's order is by latest decode
        if kept is None:
            if len(self._memo) >= MAX_TOKENS:
                del self._memo[next(iter(self._memo))]
            kept = np.full((KEEP, len(self.layers), self.n_used), -1, np.int16)
        row = np.ascontiguousarray(row, np.int16)
        _lib().smoe_memo_push(kept.ctypes.data, KEEP, len(self.layers), self.n_used, row.ctypes.data)
        self._memo[token] = kept
        self._learnt.add(token)

    # ------------------------------------------------------------------ prompts

    def start_prompt(self, tokens: list[int]) -> None:
        """A prompt's tokens are about to be decoded: what its gates pick, row by row, is kept as
        each token's decode (:meth:`end_prompt`)."""
        self._prompt = (list(tokens), {})

    def __call__(self, layer: int, _node: int, ids: np.ndarray) -> None:
        """A gate observer (prompt micro-batches): one row of picks per token."""
        if self._prompt is None or ids.ndim != 2 or ids.shape[1] != self.n_used:
            return
        i = self._index.get(layer)
        if i is not None:
            self._prompt[1].setdefault(i, []).append(np.array(ids, np.int16))

    def end_prompt(self) -> None:
        """Keep the prompt's picks, token by token; a layer that computed fewer rows than the
        prompt has tokens (the last one computes the output rows only) is left out."""
        if self._prompt is None:
            return
        tokens, rows = self._prompt
        self._prompt = None
        n = len(tokens)
        picks = np.full((n, len(self.layers), self.n_used), -1, np.int16)
        for i, parts in rows.items():
            got = np.concatenate(parts) if parts else np.zeros((0, self.n_used), np.int16)
            if got.shape[0] == n:
                picks[:, i] = np.sort(got, axis=1)
        if (picks >= 0).any():
            for token, row in zip(tokens, picks, strict=True):
                self._keep_row(int(token), row)

    # ------------------------------------------------------------------ across sessions

    def load(self, saved: SavedMemo | None) -> None:
        """Start from what earlier sessions kept (nothing if ``saved`` is None or is of another
        shape of model); this session's own decodes come before it."""
        if saved is None or saved.picks.shape[2:] != (len(self.layers), self.n_used) \
                or saved.hits.shape != self.hits.shape or not np.array_equal(saved.layers, self.layers):
            return
        for token, kept in zip(saved.tokens.tolist(), saved.picks, strict=True):
            self._memo.setdefault(int(token), kept.copy())
        self._base = (np.rint(saved.hits).astype(np.int64), np.rint(saved.scored).astype(np.int64))
        self.hits += self._base[0]
        self.scored += self._base[1]

    def learnt(self) -> SavedMemo:
        """This session's part: the tokens it decoded, with what the memo keeps of them, and the
        counts it added."""
        tokens = [t for t in self._memo if t in self._learnt]
        h0, s0 = self._base
        return SavedMemo(
            layers=self.layers.copy(), tokens=np.asarray(tokens, np.int64),
            picks=(np.stack([self._memo[t] for t in tokens]) if tokens
                   else np.zeros((0, KEEP, len(self.layers), self.n_used), np.int16)),
            hits=(self.hits - h0).astype(np.float64), scored=(self.scored - s0).astype(np.float64))

    # ------------------------------------------------------------------ report

    def summary(self) -> dict[str, Any]:
        """Over the tokens guessed: per paged layer, the recall of the top-k guess and the chance
        of use by rank; and what the prefetches saved."""
        k = self.n_used
        src = self.residency.stats.by_source.get(SOURCE)
        per_layer = {}
        for i, layer in enumerate(self.layers.tolist()):
            n = int(self.scored[i, 0])
            per_layer[int(layer)] = {
                "recall": round(int(self.hits[i, :k].sum()) / (n * k), 4) if n else 0.0,
                "p_used": [round(float(p), 3) for p in self.p_used()[i]],
            }
        return {
            "tokens": self.tokens,
            "guessed": self.guessed,
            "tokens_kept": len(self._memo),
            "per_layer": per_layer,
            "prefetch": src.as_dict() if src is not None else None,
        }


# ---------------------------------------------------------------------- the file


@dataclass
class SavedMemo:
    """A memo as saved: per token (``tokens``), its kept picks ``[KEEP, layers, n_used]``; and
    per layer and rank, the guesses' hits and guesses made (weighted by session)."""

    layers: np.ndarray
    tokens: np.ndarray
    picks: np.ndarray
    hits: np.ndarray
    scored: np.ndarray


def memo_path(profile: Path) -> Path:
    return MEMO.path(profile)


def load_memo(path: Path, model_id: str, n_expert: int, warn: Callable[[str], None]) -> SavedMemo | None:
    """The memo saved at ``path`` (None if there is no file or it cannot be used)."""

    def parse(z: Any) -> SavedMemo:
        m = SavedMemo(layers=np.asarray(z["layers"], np.int64), tokens=np.asarray(z["tokens"], np.int64),
                      picks=np.asarray(z["picks"], np.int16), hits=np.asarray(z["hits"], np.float64),
                      scored=np.asarray(z["scored"], np.float64))
        n_layer = m.layers.size
        if m.picks.ndim != 4 or m.picks.shape[0] != m.tokens.size or m.picks.shape[1] != KEEP \
                or m.picks.shape[2] != n_layer or m.hits.ndim != 2 or m.hits.shape[0] != n_layer \
                or m.scored.shape != m.hits.shape:
            raise ValueError("arrays of the wrong shape")
        if (m.picks < -1).any() or (m.picks >= n_expert).any() or m.tokens.size != np.unique(m.tokens).size \
                or not (np.isfinite(m.hits).all() and np.isfinite(m.scored).all()) \
                or (m.hits < 0).any() or (m.hits > m.scored).any():
            raise ValueError("values out of range")
        return m

    return MEMO.load(path, model_id, n_expert, 1 << 30, parse, warn)


def save_memo(profile: Path, model_id: str, n_expert: int, learnt: SavedMemo) -> None:
    """Add a session's memo to the one beside ``profile`` (its tokens' picks replace the saved
    ones; the saved counts weighted by DECAY), under the profile's lock, atomically."""
    if not learnt.tokens.size:
        return
    path = memo_path(profile)
    with locked(profile):
        old = load_memo(path, model_id, n_expert, lambda _m: None)
        if old is not None and (old.picks.shape[2:] != learnt.picks.shape[2:]
                                or not np.array_equal(old.layers, learnt.layers)):
            old = None
        tokens, picks = learnt.tokens, learnt.picks
        hits, scored = learnt.hits, learnt.scored
        if old is not None:
            keep = ~np.isin(old.tokens, tokens)
            tokens = np.concatenate([old.tokens[keep], tokens])  # the latest decoded last
            picks = np.concatenate([old.picks[keep], picks])
            hits, scored = DECAY * old.hits + hits, DECAY * old.scored + scored
        tokens, picks = tokens[-MAX_TOKENS:], picks[-MAX_TOKENS:]
        MEMO.write(path, model_id, n_expert, {"layers": learnt.layers, "tokens": tokens, "picks": picks,
                                              "hits": hits, "scored": scored})
