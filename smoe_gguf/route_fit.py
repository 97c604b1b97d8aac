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

Across sessions. Beside a tree-map profile, ``<profile>.routes.npz`` keeps every pair's decision
and, for fitted pairs, their normal equations. A session starts from it (:func:`load_routes`,
:meth:`RouteFit.load`) and, when it learns, adds what it saw to it under the profile's lock, the
older evidence weighted down by :data:`DECAY` (:func:`save_routes`). A file that is corrupt or of
another model is ignored with a warning.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .safeio import locked
from .sidecar import Sidecar

PROBE_ROWS = 32  # tokens that decide whether a pair needs a fit
FIT_BELOW = 0.9  # ... it does when the plain guess found less than this share of T's picks
RIDGE = 1.0  # pull toward the plain projection, in squared logits per sample
REFIT = 16  # new samples between two solves, at least ...
REFIT_SHARE = 0.25  # ... and at least this share of the samples so far (later samples change little)
FOLD_ROWS = 64  # samples kept apart before they are summed into a pair's normal equations


class PairFit:
    """Normal equations of one (L, T) pair and the weights solved from them."""

    def __init__(self, n_expert: int) -> None:
        f = 2 * n_expert + 1
        self.n_expert = n_expert
        self._a = np.zeros((f, f))
        self._b = np.zeros((f, n_expert))
        self._rows: list[tuple[np.ndarray, np.ndarray]] = []  # samples not summed yet (see add)
        self._n_rows = 0
        self.n = 0
        self._since = 0
        self.w: np.ndarray | None = None
        self._prior = np.zeros((f, n_expert))
        self._prior[:n_expert] = np.eye(n_expert)  # the plain projection, unchanged

    @classmethod
    def from_sums(cls, n_expert: int, a: np.ndarray, b: np.ndarray, n: int) -> "PairFit":
        """A pair whose normal equations an earlier session summed (solved at its first use)."""
        fit = cls(n_expert)
        fit._a, fit._b, fit.n, fit._since = a.copy(), b.copy(), n, n
        return fit

    def add(self, features: np.ndarray, target: np.ndarray) -> None:
        """Samples: feature rows and T's actual logits. They are summed into the normal equations
        FOLD_ROWS at a time, or when the sums are read (one product of many rows costs about
        what one of a single row does)."""
        self._rows.append((features, target))
        self._n_rows += len(features)
        self.n += len(features)
        self._since += len(features)
        if self._n_rows >= FOLD_ROWS:
            self._fold()

    def _fold(self) -> None:
        if self._rows:
            f = np.vstack([x for x, _t in self._rows])
            t = np.vstack([y for _x, y in self._rows])
            self._rows.clear()
            self._n_rows = 0
            self._a += f.T @ f
            self._b += f.T @ t

    @property
    def a(self) -> np.ndarray:
        """Sum of features^T features over every sample added."""
        self._fold()
        return self._a

    @property
    def b(self) -> np.ndarray:
        """Sum of features^T targets over every sample added."""
        self._fold()
        return self._b

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
        self._base: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, int]] = {}  # as loaded (load)

    def load(self, saved: "Routes") -> None:
        """Start from the decisions and normal equations of earlier sessions (solved here, at
        start-up, rather than at the first prompt's gates)."""
        for pair, v in saved.items():
            if v is None:
                self.fits[pair] = None
                continue
            fit = self.fits[pair] = PairFit.from_sums(self.n_expert, v[0], v[1], int(v[2]))
            fit.weights()
            self._base[pair] = (v[0], v[1], int(v[2]))

    def saved(self) -> None:
        """What has been learnt so far is saved: :meth:`learnt` counts from here."""
        self._base = {pair: (fit.a.copy(), fit.b.copy(), fit.n) for pair, fit in self.fits.items() if fit is not None}

    def learnt(self) -> "Routes":
        """What this session added: decisions, and the fitted pairs' sums less what was loaded
        (or last saved)."""
        out: Routes = {}
        for pair, fit in self.fits.items():
            if fit is None:
                out[pair] = None
                continue
            a0, b0, n0 = self._base.get(pair, (0.0, 0.0, 0))
            if fit.n > n0:
                out[pair] = (fit.a - a0, fit.b - b0, fit.n - n0)
        return out

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


Routes = dict[tuple[int, int], "tuple[np.ndarray, np.ndarray, int] | None"]  # pair -> sums, or None: plain
ROUTES = Sidecar(".routes.npz", "smoe-routes-1", "route fits", "route-fit", plural=True)  # the file beside the profile
DECAY = 0.9  # weight kept by earlier sessions' sums at each save


def routes_path(profile: Path) -> Path:
    return ROUTES.path(profile)


def load_routes(path: Path, model_id: str, n_expert: int, warn: Callable[[str], None]) -> Routes:
    """The route fits saved at ``path`` (none if there is no file or it cannot be used)."""
    f = 2 * n_expert + 1

    def parse(z: Any) -> Routes:
        out: Routes = {}
        for L, T in np.asarray(z["plain"], np.int64).reshape(-1, 2).tolist():
            out[(L, T)] = None
        for L, T in np.asarray(z["fitted"], np.int64).reshape(-1, 2).tolist():
            a, b, n = z[f"a_{L}_{T}"], z[f"b_{L}_{T}"], int(z[f"n_{L}_{T}"])
            if a.shape != (f, f) or b.shape != (f, n_expert) or n < 0 \
                    or not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise ValueError(f"pair {L}->{T} has the wrong shape")
            out[(L, T)] = (a.astype(np.float64), b.astype(np.float64), n)
        return out

    max_bytes = (1 << 16) * f * (f + n_expert) * 8  # more pairs than any model has
    return ROUTES.load(path, model_id, n_expert, max_bytes, parse, warn) or {}


def save_routes(profile: Path, model_id: str, n_expert: int, learnt: Routes) -> None:
    """Add a session's route fits to those beside ``profile`` (earlier ones weighted by DECAY),
    under the profile's lock, atomically."""
    if not learnt:
        return
    path = routes_path(profile)
    with locked(profile):
        merged = load_routes(path, model_id, n_expert, lambda _m: None)
        for pair, v in learnt.items():
            old = merged.get(pair)
            if v is None:
                merged.setdefault(pair, None)
            elif old is None:
                merged[pair] = v
            else:
                merged[pair] = (DECAY * old[0] + v[0], DECAY * old[1] + v[1], old[2] + v[2])
        arrays: dict[str, np.ndarray] = {
            "plain": np.array([p for p, v in merged.items() if v is None], np.int64).reshape(-1, 2),
            "fitted": np.array([p for p, v in merged.items() if v is not None], np.int64).reshape(-1, 2),
        }
        for (L, T), v in merged.items():
            if v is not None:
                arrays[f"a_{L}_{T}"], arrays[f"b_{L}_{T}"], arrays[f"n_{L}_{T}"] = v[0], v[1], np.array(v[2])
        ROUTES.write(path, model_id, n_expert, arrays)
