"""Speculation: guess the next MoE layers' experts from a layer's router input, and prefetch them.

At the top-k gate of layer L the graph has computed the router input of L,
``x_L = rms_norm(h_L) * w_L`` (``w_L`` the layer's FFN norm weight; the node is the second
source of ``ffn_moe_logits-L``). A later layer T's router sees ``rms_norm(h_T) * w_T``, and
``h_T`` is ``h_L`` plus what the layers in between add. Dropping those terms, the guess is

    logits_T ~= R_T @ (x_L * w_T / w_L) (+ the router bias, where the architecture has one)

for the next MoE layer (lookahead 1) and the one after it (lookahead 2). The speculator holds
every router (dequantized once from the core: ``n_layer x n_expert x n_embd`` float32) and the
norm weights.

Guesses are by rank: the ``rank`` most likely experts of each guessed layer (a multiple of the
experts a token uses), of those only the ones whose guessed router probability reaches
``threshold``. How often a guess of each rank turned out right is counted per layer and per
lookahead, and that count is the guess's probability of being used (:meth:`Speculator.p_used`).
A cost model decides what is worth reading: a guess is prefetched (and marked protected, so that
eviction keeps it; see :mod:`smoe_gguf.residency`) only when its probability of being used
exceeds what the read costs (:meth:`~smoe_gguf.residency.Residency.prefetch_bar`: a part of a
miss for the disk and I/O thread it takes, plus, where the budget is full, the chance that the
leaf evicted for it is missed again).

A prompt micro-batch is guessed the same way (one of at least ``min_batch`` tokens: fewer, at a
budget that holds few leaves per layer, leave no room beside their own leaves to read into),
each token's guess for the next MoE layer (and
for the last MoE layer, which computes only the tokens whose logits are wanted, the last
token's): an expert's chance of being needed is that some token picks it, and the leaves worth
their read are read while the micro-batch computes the layer (prompt read-ahead by prediction,
not the whole next layer). The cost model counts there only a wasted read's cost (``batch``):
a leaf the micro-batch uses is read, and evicted for, at its gate anyway.

Speculation only moves leaves: what the experts compute, and so every logit, is unchanged.
Precision (guessed leaves the router then picked) and recall (picked leaves that were guessed)
are counted for single-token gates (decode), per layer and per lookahead, at several ranks and
thresholds at once, and for micro-batches as a whole (``run --json`` shows them).

Where the plain projection finds too few of a layer's picks (the first layers, typically), a
least-squares correction learnt from this session's tokens takes its place
(:mod:`smoe_gguf.route_fit`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import ggml_abi as abi
from .errors import SmoeError
from .gguf_layout import GGUFLayout, read_values
from .readahead import layer_covering_tokens
from .residency import Residency
from .route_fit import RouteFit

NODE_LOGITS = "ffn_moe_logits-"
LOOKAHEAD = 2  # MoE layers guessed ahead of the one being gated
DEFAULT_RANK = 1.5  # guessed experts per layer, in multiples of the experts a token uses
DEFAULT_THRESHOLD = 0.0  # and of those, only the ones with at least this guessed probability
RANK_SWEEP = (1.0, 1.5, 2.0, 3.0)
THRESHOLD_SWEEP = (0.0, 0.02, 0.05, 0.1, 0.2)
_SWEEP = np.array(THRESHOLD_SWEEP)
PRIOR_WEIGHT = 4.0  # pseudo-observations behind a layer's rank counts before it has its own
RESCORE = 8  # the chances of use by rank are re-estimated every RESCORE passes over the layers
# Graph nodes between a layer's top-k and its router logits: 4 for plain top-k, 8 with expert
# groups (deepseek2: the group top-k and its mask sit in between).
SEARCH_DEPTH = 8
EMBEDDING = "token_embd.weight"
# Graph nodes between the first observed layer's router input and the token embedding it adds
# up from (its norm, the residual adds, a dense layer's nodes where one comes first).
EMBEDDING_DEPTH = 64
RMS_EPS = 1e-6  # rms_norm's epsilon where a router input is rebuilt from a hidden row (rank_input)
GATING_SIGMOID = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID


def _pr(counts: list[int] | np.ndarray) -> dict[str, float]:
    tp, guessed, actual = (int(c) for c in counts)
    return {"precision": round(tp / max(1, guessed), 4), "recall": round(tp / max(1, actual), 4)}


class LookaheadStats:
    """Scored guesses of one lookahead: per layer, how often each rank was picked, and the guess
    set's counts ``[true positives, guessed, actual]`` (per layer, and by threshold). Guesses
    are kept as they come and scored together (:meth:`flush`): one array pass per
    :data:`RESCORE` passes over the layers rather than a dozen small ones per guess."""

    def __init__(self, n_layer: int, n_expert: int, max_rank: int, n_guess: int, threshold: float) -> None:
        self.n_expert, self.max_rank, self.n_guess, self.threshold = n_expert, max_rank, n_guess, threshold
        self.rank_hits = np.zeros((n_layer, max_rank), np.int64)  # per layer: times rank r was picked
        self.scored = np.zeros(n_layer, np.int64)  # per layer: guesses scored
        self.per_layer = np.zeros((n_layer, 3), np.int64)  # the guess set (rank, threshold)
        self.by_threshold = np.zeros((len(THRESHOLD_SWEEP), 3), np.int64)
        self._layers: list[int] = []
        self._orders: list[np.ndarray] = []
        self._probs: list[np.ndarray] = []
        self._picked: list[np.ndarray] = []

    def add(self, layer: int, order: np.ndarray, p: np.ndarray, picked: np.ndarray) -> None:
        """One guess for ``layer``: experts by rank, their guessed probabilities in that order,
        and the experts the router then picked (one token's row of ids)."""
        self._layers.append(layer)
        self._orders.append(order)
        self._probs.append(p[: self.n_guess])
        self._picked.append(picked)

    @property
    def waiting(self) -> int:
        """Guesses added and not scored yet."""
        return len(self._layers)

    def flush(self) -> None:
        """Score the guesses added since the last flush."""
        if not self._layers:
            return
        layers = np.array(self._layers)
        order = np.vstack(self._orders)
        probs = np.vstack(self._probs)
        picked_ids = np.vstack(self._picked)
        self._layers, self._orders, self._probs, self._picked = [], [], [], []
        rows = np.arange(len(layers))
        picked = np.zeros((len(layers), self.n_expert), bool)
        picked[rows[:, None], picked_ids] = True
        n_actual = np.count_nonzero(picked, axis=1)
        hit = picked[rows[:, None], order]
        np.add.at(self.rank_hits, layers, hit)
        np.add.at(self.scored, layers, 1)
        cum = np.zeros((len(layers), hit.shape[1] + 1), np.int64)
        np.cumsum(hit, axis=1, out=cum[:, 1:])
        m = np.count_nonzero(probs >= self.threshold, axis=1)
        np.add.at(self.per_layer, layers, np.stack([cum[rows, m], m, n_actual], axis=1))
        ms = np.count_nonzero(probs[:, None, :] >= _SWEEP[None, :, None], axis=2)
        self.by_threshold += np.stack([np.take_along_axis(cum, ms, axis=1).sum(axis=0), ms.sum(axis=0),
                                       np.full(len(_SWEEP), n_actual.sum())], axis=1)

    def summary(self, n_used: int) -> dict[str, Any]:
        self.flush()
        n = int(self.scored.sum())
        hits = self.rank_hits.sum(axis=0)
        by_rank = {}
        for f in RANK_SWEEP:
            r = min(self.max_rank, max(1, round(f * n_used)))
            by_rank[str(r)] = _pr([int(hits[:r].sum()), r * n, n_used * n])
        return {
            **_pr(self.per_layer.sum(axis=0)),
            "scored": n,
            "per_layer": {layer: _pr(self.per_layer[layer]) for layer in np.flatnonzero(self.scored).tolist()},
            "by_rank": by_rank,
            "by_threshold": {str(t): _pr(c) for t, c in zip(THRESHOLD_SWEEP, self.by_threshold)},
        }


@dataclass
class SpecStats:
    guesses: int = 0  # single-token gates at which later layers were guessed
    prefetched: int = 0  # leaves handed to the I/O threads
    protected: int = 0  # leaves marked protected (resident or queued guesses worth keeping)
    skipped: int = 0  # guesses of the guess set below the cost model's bar
    prompt: list[int] = field(default_factory=lambda: [0, 0, 0])  # micro-batches: the next layer's union
    lookahead: dict[int, LookaheadStats] = field(default_factory=dict)


class Speculator:
    """A gate observer (:meth:`smoe_gguf.gate.Gate.observe`) that prefetches the next layers' guesses."""

    def __init__(self, core: GGUFLayout, residency: Residency, n_expert_used: int,
                 threshold: float = DEFAULT_THRESHOLD, rank: float = DEFAULT_RANK,
                 lookahead: int = LOOKAHEAD) -> None:
        self.residency = residency
        self.n_used = n_expert_used
        self.n_expert = residency.state.n_expert
        self.threshold = threshold
        self.rank = rank
        self.n_guess = min(self.n_expert, max(1, round(rank * n_expert_used)))
        self.max_rank = min(self.n_expert, max(self.n_guess, round(max(RANK_SWEEP) * n_expert_used)))
        self.lookahead = max(0, lookahead)
        # a prompt micro-batch smaller than this is not guessed (see __call__)
        self.min_batch = layer_covering_tokens(self.n_expert, n_expert_used)
        paged = sorted(residency.costs)  # MoE layers (dense ones have nothing to guess)
        self.stats = SpecStats(lookahead={
            a: LookaheadStats(residency.n_layer, self.n_expert, self.max_rank, self.n_guess, threshold)
            for a in range(1, self.lookahead + 1)})
        self._rescore_every = RESCORE * len(paged)
        self._ahead = {layer: paged[i + 1 : i + 1 + self.lookahead] for i, layer in enumerate(paged)}
        self._router: list[np.ndarray | None] | None = None  # per layer: [n_expert, n_embd]
        self._bias: list[np.ndarray | None] = []
        self._sel_bias: list[np.ndarray | None] = []  # exp_probs_b: added to the gating output for selection
        self._norm: list[np.ndarray | None] = []
        self._scaled: dict[tuple[int, int], np.ndarray] = {}  # (here, there) -> scaled router, transposed
        self._proj: dict[int, tuple[list[tuple[int, int]], np.ndarray, np.ndarray] | None] = {}  # see _projections
        # per guessed layer: (lookahead, ranked experts, their guessed probabilities)
        self._pending: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        self._prompt_pending: dict[int, np.ndarray] = {}  # per layer: a micro-batch's guessed experts
        self._feat: dict[int, list[tuple[int, np.ndarray]]] = {}  # per layer T: (L, features at L) to fit
        self.fit = RouteFit(self.n_expert, n_expert_used, self.n_guess)
        self._p_used: dict[tuple[int, int], np.ndarray] = {}  # (lookahead, layer) -> p_used, until rescored
        self.rescored = 0  # times the chances of use were estimated anew (what the C path's tables follow)
        self._logits_at: dict[int, int] = {}  # top-k node -> its ffn_moe_logits node (graphs are reused)
        self._last_paged = paged[-1]
        self._last_layer = -1
        self._buf = np.empty(0, np.float32)
        self.embedding: int | None = None  # token_embd.weight in llama.cpp's graph (see token_guess)
        # The routers and every per-layer norm (which norm feeds the router is read from the graph
        # later), read into memory at start-up: llama.cpp reads the core with direct I/O, so mapped
        # instead they would fault in from the disk inside the first prompt's gates.
        self._sigmoid = any(key.endswith(".expert_gating_func") and kv.value == GATING_SIGMOID
                            for key, kv in core.kvs.items())
        self._tensors = read_values(core, [
            t.name for t in core.tensors
            if t.name.startswith("blk.") and ("ffn_gate_inp." in t.name or "norm" in t.name or "exp_probs_b" in t.name)])

    # ------------------------------------------------------------------ weights (once)

    def _load_weights(self, norm_suffix: str) -> None:
        n_layer = self.residency.n_layer
        t = self._tensors
        self._router = [t.get(f"blk.{layer}.ffn_gate_inp.weight") for layer in range(n_layer)]
        self._bias = [t.get(f"blk.{layer}.ffn_gate_inp.bias") for layer in range(n_layer)]
        self._sel_bias = [t.get(f"blk.{layer}.exp_probs_b.bias") for layer in range(n_layer)]
        self._norm = [t.get(f"blk.{layer}.{norm_suffix}") for layer in range(n_layer)]

    def _scaled_router(self, here: int, there: int) -> np.ndarray | None:
        """Layer ``there``'s router, transposed, its rows scaled by the norm ratio
        ``w_there / w_here`` (0 where ``w_here`` is; none for ``here == there``), so that one
        product of ``here``'s router input gives the logits; made once per pair."""
        key = (here, there)
        m = self._scaled.get(key)
        if m is None:
            assert self._router is not None
            router = self._router[there]
            if router is None:
                return None
            if here != there:
                w_there, w_here = self._norm[there], self._norm[here]
                if w_there is None or w_here is None or w_there.shape != w_here.shape \
                        or router.shape[1] != w_here.shape[0]:
                    return None
                router = router * np.divide(w_there, w_here, out=np.zeros_like(w_there), where=w_here != 0)
            m = self._scaled[key] = np.ascontiguousarray(router.T)
        return m

    # ------------------------------------------------------------------ the observer

    def forget(self) -> None:
        """Drop guesses not yet scored and their protection (the gate skips observers for a
        while, or a prompt begins)."""
        self._pending.clear()
        self._prompt_pending.clear()
        self._feat.clear()
        self.residency.state.protect[:] = 0
        self._last_layer = -1

    def p_used(self, lookahead: int, layer: int) -> np.ndarray:
        """Per rank, the chance that a guess of that rank for ``layer`` at ``lookahead`` is picked:
        this layer's counts, behind PRIOR_WEIGHT observations of all layers' (themselves behind
        an even guess for the top k and a low one below)."""
        key = (lookahead, layer)
        p = self._p_used.get(key)
        if p is None:
            p = self._p_used[key] = self._estimate(lookahead, layer)
        return p

    def rescore(self, lookahead: int, elsewhere: int = 0) -> bool:
        """Every RESCORE passes over the layers (guesses scored here, and ``elsewhere``: by the C
        path), score the guesses kept and estimate every layer's chances of use anew; True then."""
        st = self.stats.lookahead[lookahead]
        if st.waiting + elsewhere < self._rescore_every:
            return False
        st.flush()
        for key in [k for k in self._p_used if k[0] == lookahead]:
            del self._p_used[key]
        self.rescored += 1
        return True

    # ------------------------------------------------------------------ for the C path (spec_native)

    @property
    def weights_loaded(self) -> bool:
        """The routers are read (at the first gate observed: which norm feeds them is read from the graph)."""
        return self._router is not None

    @property
    def ahead(self) -> dict[int, list[int]]:
        """Per MoE layer, the layers guessed from its gate (lookahead 1 first)."""
        return self._ahead

    @property
    def guessed_layers(self) -> list[int]:
        return sorted({t for ts in self._ahead.values() for t in ts})

    @property
    def sigmoid(self) -> bool:
        """The selection scores are sigmoid(logits) (plus the selection bias), not the softmax."""
        return self._sigmoid

    @property
    def selection_bias(self) -> list[np.ndarray | None]:
        """Per layer, the bias added to the scores for selection (exp_probs_b), or None."""
        return self._sel_bias

    def rank_input(self, layer: int, h: np.ndarray) -> np.ndarray | None:
        """The first ``max_rank`` experts of ``layer`` in its router's order for the hidden row
        ``h``, taken as its router input ``rms_norm(h) * w``; None where the layer has no router
        or ``h`` is not of its width."""
        if self._router is None or self._router[layer] is None:
            return None
        w = self._norm[layer]
        own = self._scaled_router(layer, layer)
        if own is None or h.shape[0] != own.shape[0] or (w is not None and w.shape != h.shape):
            return None
        x = h / np.sqrt(np.mean(h * h) + RMS_EPS)
        logits = (x if w is None else x * w) @ own
        if self._bias[layer] is not None:
            logits = logits + self._bias[layer]
        return self._ranked(layer, logits)[1]

    def _estimate(self, lookahead: int, layer: int) -> np.ndarray:
        st = self.stats.lookahead[lookahead]
        prior = rank_prior(self.max_rank, self.n_used)
        n_all = int(st.scored.sum())
        if n_all:
            prior = (st.rank_hits.sum(axis=0) + 2.0 * prior) / (n_all + 2.0)
        if not st.scored[layer]:
            return prior
        return (st.rank_hits[layer] + PRIOR_WEIGHT * prior) / (st.scored[layer] + PRIOR_WEIGHT)

    def __call__(self, layer: int, node: int, ids: np.ndarray) -> None:
        state = self.residency.state
        if layer <= self._last_layer:  # a new pass over the layers: what is left of the last one is stale
            state.protect[:] = 0
            self._pending.clear()
            self._prompt_pending.clear()
            self._feat.clear()
        self._last_layer = layer
        n = ids.shape[0]
        if 1 < n < self.min_batch:
            # A micro-batch this small (a budget that holds few leaves per layer: n * k below
            # twice a layer's experts) reads its own leaves and little else fits beside them: a
            # guess would cost its Python at every gate of the prompt and save no read. The routers
            # and the embedding are still found at the first such gate (decoded tokens use them).
            if self._router is None:
                self._router_input(node, layer, n)
            return
        self._score(layer, ids)
        feats = self._feat.pop(layer, None)
        targets = self._ahead.get(layer, [])
        if not targets and not feats:
            return
        x = self._router_input(node, layer, n)
        if x is None or self._router is None:
            return
        proj = self.projections(layer, targets)
        if proj is None:
            return
        looks, matrix, bias = proj
        everything = x @ matrix + bias  # this layer's router logits, then each target's plain guess
        e = self.n_expert
        own = everything[:, :e]
        if feats:  # samples for the fits of pairs that end here
            for src, f in feats:
                if len(f) >= n:
                    self.fit.add((src, layer), f[len(f) - n :], own)  # the last layer: output rows only
        if not looks:
            return
        guessed = []  # (lookahead, target, logits)
        for i, (a, target) in enumerate(looks, 1):
            logits = everything[:, i * e : (i + 1) * e]
            pair = (layer, target)
            if self.fit.wanted(pair):
                f = RouteFit.features(logits, own)
                self._feat.setdefault(target, []).append((layer, f))
                fitted = self.fit.predict(pair, f)
                if fitted is not None:
                    logits = fitted
            if n > 1 and a > 1:
                continue  # a micro-batch's next layer is most of a layer's leaves already: no further
            guessed.append((a, target, logits))
        if not guessed:
            return
        bar = self.residency.prefetch_bar(batch=n > 1)
        if n == 1:
            keys, prios = self._guess_token(guessed, bar)
        else:
            keys, prios = self._guess_batch(guessed, bar)
        if keys:
            order_k = sorted(range(len(keys)), key=lambda i: -prios[i])
            self.stats.prefetched += self.residency.prefetch(
                [keys[i] for i in order_k], layer=layer, in_use=np.unique(ids).tolist(),
                priority=[prios[i] for i in order_k], source="speculation")

    def _guess_token(self, guessed: list[tuple[int, int, np.ndarray]],
                     bar: float) -> tuple[list[tuple[int, int]], list[float]]:
        """A decoded token's guesses, every guessed layer at once: the guess set (top n_guess
        above the threshold) of each, of which the leaves whose chance of use (by rank) reaches
        ``bar`` are protected; those not resident are returned, with that chance, to prefetch
        (for a layer beyond the next one, only where the chance also reaches
        :meth:`~smoe_gguf.residency.Residency.ahead_cost` more)."""
        state = self.residency.state
        g = self.n_guess
        layers = np.array([t for _a, t, _l in guessed])
        p, order = self._ranked_rows(layers, np.vstack([lg for _a, _t, lg in guessed]))
        ps = np.take_along_axis(p, order, axis=1)
        pu = np.vstack([self.p_used(a, t)[:g] for a, t, _l in guessed])
        ok = ps[:, :g] >= self.threshold
        kept = ok & (pu >= bar)
        for i, (a, t, _l) in enumerate(guessed):
            self._pending.setdefault(t, []).append((a, order[i], ps[i]))
        rows, ranks = np.nonzero(kept)
        k_layers, k_experts = layers[rows], order[rows, ranks]
        state.protect[layers] = 0  # the newest guess for a layer replaces an older one
        state.protect[k_layers, k_experts] = 1
        st = self.stats
        st.guesses += 1
        st.protected += int(rows.size)
        st.skipped += int(np.count_nonzero(ok)) - int(rows.size)
        ahead = np.array([a for a, _t, _l in guessed])[rows] > 1
        out = (state.resident[k_layers, k_experts] == 0) & (~ahead | (pu[rows, ranks] >= bar + self.residency.ahead_cost()))
        keys = list(zip(k_layers[out].tolist(), k_experts[out].tolist()))
        return keys, pu[rows[out], ranks[out]].tolist()

    def _guess_batch(self, guessed: list[tuple[int, int, np.ndarray]],
                     bar: float) -> tuple[list[tuple[int, int]], list[float]]:
        """A prompt micro-batch's guess for the next layer: per expert, the chance that some
        token picks it (each token's guesses taken as independent), over the guess set; the
        leaves whose chance reaches ``bar`` are protected, those not resident returned to prefetch."""
        state = self.residency.state
        keys: list[tuple[int, int]] = []
        prios: list[float] = []
        for a, target, logits in guessed:
            if target == self._last_paged:
                logits = logits[-1:]  # the last layer computes the tokens whose logits are wanted only
            pu = self.p_used(a, target)[: self.n_guess]
            p, order = self._ranked(target, logits)
            ps = np.take_along_axis(p, order, axis=1)
            ranks = order[:, : self.n_guess]
            ok = ps[:, : self.n_guess] >= self.threshold
            miss = np.zeros(self.n_expert)
            np.add.at(miss, ranks[ok], np.log1p(-np.minimum(pu, 1 - 1e-9))[np.nonzero(ok)[1]])
            self._prompt_pending[target] = np.unique(ranks[ok])
            p_any = 1.0 - np.exp(miss)
            cand = np.flatnonzero(p_any > 0)
            kept = cand[p_any[cand] >= bar]
            state.protect[target] = 0  # the newest guess for a layer replaces an older one
            state.protect[target, kept] = 1
            self.stats.protected += int(kept.size)
            self.stats.skipped += int(cand.size - kept.size)
            for e in kept.tolist():
                if not state.resident[target, e]:
                    keys.append((target, e))
                    prios.append(float(p_any[e]))
        return keys, prios

    def _ranked(self, target: int, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Layer ``target``'s router probabilities from ``logits`` (a row per token, or one row)
        and, along the last axis, the first ``max_rank`` experts in the order its selection
        ranks them (with its selection bias, and its gating function's scores)."""
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        sel = self._sel_bias[target]
        score = p if sel is None else (1.0 / (1.0 + np.exp(-logits)) if self._sigmoid else p) + sel
        return p, np.argsort(-score, axis=-1, kind="stable")[..., : self.max_rank]

    def _ranked_rows(self, layers: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_ranked` of one row of ``logits`` per guessed layer of ``layers``."""
        if any(self._sel_bias[t] is not None for t in layers.tolist()):
            ranked = [self._ranked(t, row) for t, row in zip(layers.tolist(), logits)]
            return np.vstack([p for p, _o in ranked]), np.vstack([o for _p, o in ranked])
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        return p, np.argsort(-p, axis=-1, kind="stable")[:, : self.max_rank]

    def _score(self, layer: int, ids: np.ndarray) -> None:
        """Score the guesses made for ``layer`` against what its router picked."""
        n = ids.shape[0]
        pending = self._pending.pop(layer, None)
        if pending is not None and n == 1:
            for a, order, p in pending:
                st = self.stats.lookahead[a]
                st.add(layer, order, p, np.array(ids[0]))  # ids are valid during the call only
                self.rescore(a)
        guessed = self._prompt_pending.pop(layer, None)
        if guessed is not None and n > 1:
            actual = np.unique(ids)
            c = self.stats.prompt
            c[0] += int(np.isin(guessed, actual).sum())
            c[1] += int(guessed.size)
            c[2] += int(actual.size)

    def projections(self, layer: int, targets: list[int]) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray] | None:
        """For one product of ``layer``'s router input rows: the guessed layers it can project to
        (lookahead, layer), and the matrix and bias whose columns give ``layer``'s own router
        logits, then each of those layers' plain guess (its router with the norm ratio); made
        once per layer. None where ``layer`` has no router."""
        if layer in self._proj:
            return self._proj[layer]
        own = self._scaled_router(layer, layer)
        out = None
        if own is not None:
            looks: list[tuple[int, int]] = []
            mats, biases = [own], [self._bias[layer]]
            for a, target in enumerate(targets, 1):
                m = self._scaled_router(layer, target)
                if m is not None and m.shape[0] == own.shape[0]:
                    looks.append((a, target))
                    mats.append(m)
                    biases.append(self._bias[target])
            bias = np.concatenate([np.zeros(self.n_expert, np.float32) if b is None else b for b in biases])
            out = (looks, np.ascontiguousarray(np.hstack(mats)), bias)
        self._proj[layer] = out
        return out

    def _router_input(self, node: int, layer: int, n_tokens: int) -> np.ndarray | None:
        """``x_L`` of the micro-batch's tokens (``[n_tokens, n_embd]``): the second source of
        ``ffn_moe_logits-L``, found by walking up from the top-k node; loads the router weights
        the first time."""
        name = f"{NODE_LOGITS}{layer}".encode()
        logits = self._logits_at.get(node)
        if logits is None or abi.tensor_at(logits).name != name:
            logits = _find_up(node, name, depth=SEARCH_DEPTH)
            if logits is None:
                return None
            self._logits_at[node] = logits
        x_addr = abi.tensor_at(logits).src[1]
        xt = abi.tensor_at(x_addr)
        if self._router is None:
            norm = xt.src[1] if xt.src[1] else None
            name = abi.tensor_at(norm).name.decode() if norm else ""
            prefix = f"blk.{layer}."
            if not name.startswith(prefix):
                raise SmoeError(f"speculation: the router input of layer {layer} is not a norm ({name!r})")
            self._load_weights(name[len(prefix):])
            self.embedding = _find_up(x_addr, EMBEDDING.encode(), depth=EMBEDDING_DEPTH)
        n_embd, rows, stride = int(xt.ne[0]), int(xt.ne[1]), int(xt.nb[1])
        if xt.type != 0 or int(xt.nb[0]) != 4 or rows != n_tokens or stride % 4:
            return None  # F32 rows, one per token of the micro-batch: what llama.cpp builds
        step = stride // 4
        need = (rows - 1) * step + n_embd
        if self._buf.size < need:
            self._buf = np.empty(need, np.float32)
        abi.ggml_backend_tensor_get(x_addr, self._buf.ctypes.data, 0, need * 4)
        if rows == 1:
            return self._buf[None, :n_embd]
        return np.lib.stride_tricks.as_strided(self._buf, shape=(rows, n_embd), strides=(stride, 4), writeable=False)

    def summary(self) -> dict[str, Any]:
        """Precision and recall of the guess set (lookahead 1 at the top, then per lookahead:
        per layer, by rank, by threshold), and what speculation's prefetches saved."""
        st = self.stats
        ahead = {str(a): s.summary(self.n_used) for a, s in st.lookahead.items()}
        first = ahead.get("1", {})
        src = self.residency.stats.by_source.get("speculation")
        return {
            "rank": self.n_guess,
            "threshold": self.threshold,
            "lookahead": self.lookahead,
            "guesses": st.guesses,
            "prefetched": st.prefetched,
            "protected": st.protected,
            "below_cost": st.skipped,
            "precision": first.get("precision", 0.0),
            "recall": first.get("recall", 0.0),
            "lookaheads": ahead,
            "prompt": _pr(st.prompt),
            "corrected": self.fit.summary(),
            "prefetch": src.as_dict() if src is not None else None,
        }


def rank_prior(max_rank: int, n_used: int) -> np.ndarray:
    """Per rank, the chance of use a guess starts from before any is counted: even for the top
    ``n_used``, low below."""
    return np.where(np.arange(max_rank) < n_used, 0.5, 0.2)


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
