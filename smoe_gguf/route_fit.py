"""A learnt correction to the router projection, for the layer pairs where it guesses badly.

Speculation guesses layer T's router logits from layer L's router input by applying T's router
to it (:mod:`smoe_gguf.speculate`). In the first layers the residual stream still changes a lot
between L and T, and that plain projection finds few of T's experts. For such a pair a linear
map is fitted by least squares, from the features ``[plain logits of T, L's own router logits,
1]`` of each token to T's actual router logits (which the gate of T computes from T's own router
input), ridge-regularised toward the plain projection, so that few samples change little.
Samples come from every observed token: a prompt micro-batch gives one per token at once.

A pair is fitted only where the plain projection is not enough: its first :data:`PROBE_ROWS`
tokens decide (the plain guess's recall of T's picks below :data:`FIT_BELOW`). The fit only
reorders guesses: what the experts compute is never touched.
"""

from __future__ import annotations

import numpy as np

PROBE_ROWS = 32  # tokens that decide whether a pair needs a fit
FIT_BELOW = 0.9  # ... it does when the plain guess found less than this share of T's picks
RIDGE = 1.0  # pull toward the plain projection, in squared logits per sample
REFIT = 16  # new samples between two solves, at least ...
REFIT_SHARE = 0.25  # ... and at least this share of the samples so far (later samples change little)


class PairFit:
    """Normal equations of one (L, T) pair and the weights solved from them."""

    def __init__(self, n_expert: int) -> None:
        f = 2 * n_expert + 1
        self.n_expert = n_expert
        self.a = np.zeros((f, f))
        self.b = np.zeros((f, n_expert))
        self.n = 0
        self._since = 0
        self.w: np.ndarray | None = None
        self._prior = np.zeros((f, n_expert))
        self._prior[:n_expert] = np.eye(n_expert)  # the plain projection, unchanged

    def add(self, features: np.ndarray, target: np.ndarray) -> None:
        self.a += features.T @ features
        self.b += features.T @ target
        self.n += len(features)
        self._since += len(features)

    def weights(self) -> np.ndarray | None:
        """The fitted map (features -> logits), re-solved once REFIT new samples and REFIT_SHARE
        of the earlier ones have come."""
        if self._since >= max(REFIT, REFIT_SHARE * (self.n - self._since)) or (self.w is None and self.n):
            f = self.a.shape[0]
            self.w = np.linalg.solve(self.a + RIDGE * np.eye(f), self.b + RIDGE * self._prior)
            self._since = 0
        return self.w


class RouteFit:
    """Per (L, T) pair: undecided (probe rows kept), plain enough, or fitted."""

    def __init__(self, n_expert: int, n_used: int, n_guess: int) -> None:
        self.n_expert = n_expert
        self.n_used = n_used
        self.n_guess = n_guess
        self._probe: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
        self.fits: dict[tuple[int, int], PairFit | None] = {}  # None: the plain projection is enough

    @staticmethod
    def features(plain: np.ndarray, own: np.ndarray) -> np.ndarray:
        return np.hstack([plain, own, np.ones((len(plain), 1))])

    def wanted(self, pair: tuple[int, int]) -> bool:
        """Whether samples of ``pair`` are still of use."""
        return self.fits.get(pair, 0) is not None

    def predict(self, pair: tuple[int, int], features: np.ndarray) -> np.ndarray | None:
        """Corrected logits for ``pair``, or None where it is not fitted (yet)."""
        fit = self.fits.get(pair)
        w = fit.weights() if fit is not None else None
        return None if w is None else features @ w

    def add(self, pair: tuple[int, int], features: np.ndarray, target: np.ndarray) -> None:
        """Samples of ``pair``: the features at L and T's actual router logits, row for row."""
        fit = self.fits.get(pair, 0)
        if fit is None:
            return
        if isinstance(fit, PairFit):
            fit.add(features, target)
            return
        probe = self._probe.setdefault(pair, [])
        probe.append((features, target))
        rows = sum(len(f) for f, _t in probe)
        if rows < PROBE_ROWS:
            return
        feats = np.vstack([f for f, _t in probe])
        targets = np.vstack([t for _f, t in probe])
        del self._probe[pair]
        plain = feats[:, : self.n_expert]
        if top_recall(plain, targets, self.n_used, self.n_guess) >= FIT_BELOW:
            self.fits[pair] = None
            return
        fit = self.fits[pair] = PairFit(self.n_expert)
        fit.add(feats, targets)

    def summary(self) -> dict[str, object]:
        return {"fitted": sorted(f"{a}->{b}" for (a, b), f in self.fits.items() if f is not None),
                "plain": sorted(f"{a}->{b}" for (a, b), f in self.fits.items() if f is None)}


def top_recall(guess: np.ndarray, actual: np.ndarray, n_used: int, n_guess: int) -> float:
    """The share of each row's ``n_used`` highest actual logits found among its ``n_guess``
    highest guessed ones."""
    g = np.argsort(-guess, axis=1)[:, :n_guess]
    a = np.argsort(-actual, axis=1)[:, :n_used]
    found = sum(len(np.intersect1d(x, y)) for x, y in zip(g, a))
    return found / max(1, a.size)
