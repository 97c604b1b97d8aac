"""The tree-map: a per-user profile of which leaves fire together, learnt from use.

Evidence. A :class:`Recorder` (a gate observer) counts, per *window* (a prompt, then every
:data:`WINDOW_TOKENS` generated tokens), how often each leaf (layer, expert) was selected. A
window is a sparse vector over all leaves; leaves that fire together share windows.

Profile. Per model (its source's sha256), a JSON file under the user's cache directory
(``$XDG_CACHE_HOME/smoe-gguf/profiles/``, or ``--profile PATH``) holds, versioned:

- ``usage``: decayed use count of every leaf (what warms the X-Slot at load and what ``--pin``
  pins);
- ``windows``: the most recent windows with a weight that decays (``DECAY`` per session that
  saves), at most :data:`MAX_WINDOWS`;
- ``tree``: the branches, rebuilt at every save by recursive spherical k-means over the
  windows (branching <= :data:`BRANCHING`, depth <= :data:`MAX_DEPTH`): each node has the
  leaves its windows use most (its *centroid*).

Saving re-reads the file under an exclusive lock (``fcntl.flock`` on ``<file>.lock``), merges this
session's evidence into it, and replaces it atomically: two processes saving at once both count.
A file that is corrupt, of another version or of another model is ignored with a warning (the
first two are rewritten on save; another model's is left alone), never a crash.

Use. At load the profile's most used leaves are prefetched within the budget; ``--pin N`` keeps
the N most used resident. At a prompt, the branch closest to the leaves its first layers
selected is found (descending the tree by cosine similarity) and its leaves in later layers
are prefetched while the prompt is computed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SmoeError
from .residency import Residency
from .safeio import locked, read_file, replace_atomically

FORMAT = "smoe-profile"
VERSION = 1
DECAY = 0.9  # weight kept by old evidence at each save
MAX_WINDOWS = 256
MIN_WEIGHT = 0.05
WINDOW_TOKENS = 32
BRANCHING = 4
MAX_DEPTH = 3
MIN_NODE_WINDOWS = 4
TOP_LEAVES = 64  # leaves kept per tree node
PROMPT_LAYERS = 2  # layers of the prompt used to choose a branch
BRANCH_PRIORITY = 0.2  # a branch's leaves are read after likelier prefetches

Warn = Callable[[str], None]


def default_path(model_id: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "smoe-gguf" / "profiles" / f"{model_id[:32]}.json"


@dataclass
class Node:
    weight: float  # summed window weight
    leaves: list[tuple[int, int, float]]  # (layer, expert, share of the node's selections), most first
    children: list["Node"] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"weight": round(self.weight, 4), "leaves": [[l, e, round(s, 5)] for l, e, s in self.leaves],
                "children": [c.to_json() for c in self.children]}

    @classmethod
    def from_json(cls, d: Any, n_layer: int, n_expert: int, depth: int = 0) -> "Node":
        """A node checked as :meth:`to_json` writes it: leaves in range, at most
        :data:`BRANCHING` children, at most :data:`MAX_DEPTH` levels (ValueError otherwise)."""
        if not isinstance(d, dict) or depth >= MAX_DEPTH:
            raise ValueError("a tree node is malformed or nested too deeply")
        leaves, children = d["leaves"], d.get("children", [])
        if not isinstance(leaves, list) or len(leaves) > TOP_LEAVES or not isinstance(children, list) \
                or len(children) > BRANCHING:
            raise ValueError("a tree node has too many leaves or children")
        out = []
        for leaf in leaves:
            if not isinstance(leaf, list) or len(leaf) != 3:
                raise ValueError("a tree leaf is not [layer, expert, share]")
            l, e, s = _index(leaf[0], n_layer), _index(leaf[1], n_expert), _number(leaf[2])
            out.append((l, e, s))
        return cls(_number(d["weight"]), out, [cls.from_json(c, n_layer, n_expert, depth + 1) for c in children])


@dataclass
class Profile:
    model_id: str
    n_layer: int
    n_expert: int
    usage: np.ndarray  # float64 [n_layer, n_expert]
    windows: list[tuple[float, dict[int, float]]]  # (weight, flat leaf index -> count)
    tree: Node | None = None
    sessions: int = 0

    @classmethod
    def empty(cls, model_id: str, n_layer: int, n_expert: int) -> "Profile":
        return cls(model_id, n_layer, n_expert, np.zeros((n_layer, n_expert)), [])

    # ------------------------------------------------------------------ files

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "model": self.model_id,
            "n_layer": self.n_layer, "n_expert": self.n_expert, "sessions": self.sessions,
            "usage": np.round(self.usage, 4).tolist(),
            "windows": [[round(w, 5), {str(k): round(v, 3) for k, v in win.items()}] for w, win in self.windows],
            "tree": self.tree.to_json() if self.tree else None,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Profile":
        """A profile checked as :meth:`to_json` writes it (ValueError, KeyError or TypeError otherwise)."""
        n_layer, n_expert = _index(d["n_layer"], 1 << 16), _index(d["n_expert"], 1 << 16)
        usage = np.asarray(d["usage"], np.float64)
        if usage.shape != (n_layer, n_expert) or not np.isfinite(usage).all() or (usage < 0).any():
            raise ValueError("usage has the wrong shape or values")
        if not isinstance(d["windows"], list) or len(d["windows"]) > MAX_WINDOWS:
            raise ValueError(f"windows is not a list of at most {MAX_WINDOWS}")
        windows = []
        for item in d["windows"]:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], dict):
                raise ValueError("a window is not [weight, {leaf: count}]")
            windows.append((_number(item[0]), {_index(int(k), n_layer * n_expert): _number(v) for k, v in item[1].items()}))
        tree = Node.from_json(d["tree"], n_layer, n_expert) if d.get("tree") else None
        sessions = d.get("sessions", 0)
        if type(sessions) is not int or sessions < 0:
            raise ValueError("sessions is not a count")
        return cls(str(d["model"]), n_layer, n_expert, usage, windows, tree, sessions)

    # ------------------------------------------------------------------ evidence

    def merge(self, windows: list[dict[int, float]]) -> None:
        """Decay old evidence, add a session's windows, rebuild the tree."""
        self.usage *= DECAY
        self.windows = [(w * DECAY, win) for w, win in self.windows if w * DECAY >= MIN_WEIGHT]
        for win in windows:
            if not win:
                continue
            self.windows.append((1.0, win))
            for k, v in win.items():
                self.usage.flat[k] += v
        self.windows = self.windows[-MAX_WINDOWS:]
        self.sessions += 1
        self.tree = build_tree(self.windows, self.n_layer * self.n_expert, self.n_expert)

    def hottest(self, n: int) -> list[tuple[int, int]]:
        """The ``n`` most used leaves, most first (leaves never used are not listed)."""
        flat = np.argsort(-self.usage, axis=None, kind="stable")[:n]
        return [divmod(int(k), self.n_expert) for k in flat if self.usage.flat[k] > 0]

    def branch_for(self, counts: np.ndarray, layers: int) -> Node | None:
        """Descend the tree toward the node whose first ``layers`` layers look most like ``counts``
        (``[n_layer, n_expert]``, only those layers used); None without a tree."""
        node = self.tree
        if node is None:
            return None
        q = counts[:layers].ravel()
        if not q.any():
            return None
        q = q / np.linalg.norm(q)
        while node.children:
            best, best_sim = None, 0.0
            for child in node.children:
                v = np.zeros(layers * self.n_expert)
                for l, e, s in child.leaves:
                    if l < layers:
                        v[l * self.n_expert + e] = s
                n = np.linalg.norm(v)
                sim = float(q @ v / n) if n else 0.0
                if sim > best_sim:
                    best, best_sim = child, sim
            if best is None:
                break
            node = best
        return node


def build_tree(windows: list[tuple[float, dict[int, float]]], dim: int, n_expert: int) -> Node | None:
    if not windows:
        return None
    x = np.zeros((len(windows), dim))
    w = np.zeros(len(windows))
    for i, (wt, win) in enumerate(windows):
        for k, v in win.items():
            x[i, k] = v
        w[i] = wt
    return _node(x, w, n_expert, 0)


def _node(x: np.ndarray, w: np.ndarray, n_expert: int, depth: int) -> Node:
    total = (x * w[:, None]).sum(axis=0)
    share = total / max(total.sum(), 1e-12)
    top = np.argsort(-share, kind="stable")[:TOP_LEAVES]
    node = Node(float(w.sum()), [(*divmod(int(k), n_expert), float(share[k])) for k in top if share[k] > 0])
    if depth + 1 >= MAX_DEPTH or len(x) < 2 * MIN_NODE_WINDOWS:
        return node
    labels = _kmeans(x, w, min(BRANCHING, len(x) // MIN_NODE_WINDOWS))
    if len(set(labels.tolist())) < 2:
        return node
    for c in sorted(set(labels.tolist()), key=lambda c: -w[labels == c].sum()):
        sel = labels == c
        node.children.append(_node(x[sel], w[sel], n_expert, depth + 1))
    return node


def _kmeans(x: np.ndarray, w: np.ndarray, k: int, iters: int = 20) -> np.ndarray:
    """Weighted spherical k-means with deterministic farthest-point seeding."""
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    centers = [xn[int(np.argmax(w))]]
    for _ in range(1, k):
        sim = np.max(xn @ np.array(centers).T, axis=1)
        centers.append(xn[int(np.argmin(sim))])
    c = np.array(centers)
    labels = np.zeros(len(x), int)
    for _ in range(iters):
        new = np.argmax(xn @ c.T, axis=1)
        if _ and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            m = labels == j
            if m.any():
                v = (xn[m] * w[m, None]).sum(axis=0)
                c[j] = v / max(np.linalg.norm(v), 1e-12)
    return labels


# ---------------------------------------------------------------------- load / save


def load(path: Path, model_id: str, n_layer: int, n_expert: int, warn: Warn) -> tuple[Profile, bool]:
    """The profile at ``path`` (empty if there is none or it cannot be used), and whether a save
    may write that file (False for another model's profile)."""
    empty = Profile.empty(model_id, n_layer, n_expert)
    limit = max_bytes(n_layer, n_expert)
    try:
        text = read_file(path, limit=limit).decode("utf-8")
    except SmoeError as e:
        if not os.path.lexists(path):
            return empty, True
        warn(f"profile {e}; ignoring it, a new one replaces it")
        return empty, True
    except UnicodeDecodeError as e:
        warn(f"profile {path} cannot be read ({e}); starting a new one")
        return empty, True
    try:
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError("not a smoe-gguf profile")
    except (ValueError, RecursionError) as e:
        warn(f"profile {path} is corrupt ({str(e)[:120] or 'nested too deeply'}); ignoring it, a new one replaces it")
        return empty, True
    if d.get("version") != VERSION:
        warn(f"profile {path} is version {d.get('version')}, this is {VERSION}; ignoring it, a new one replaces it")
        return empty, True
    if d.get("model") != model_id or d.get("n_layer") != n_layer or d.get("n_expert") != n_expert:
        warn(f"profile {path} belongs to another model; ignoring it (and leaving it alone)")
        return empty, False
    try:
        return Profile.from_json(d), True
    except (KeyError, TypeError, ValueError, OverflowError, IndexError, AttributeError, RecursionError) as e:
        warn(f"profile {path} is corrupt ({str(e)[:120]}); ignoring it, a new one replaces it")
        return empty, True


def max_bytes(n_layer: int, n_expert: int) -> int:
    """The most bytes a profile of this model can take as :func:`save` writes it (with room to
    spare); a larger file is not read."""
    leaves = n_layer * n_expert
    return MAX_WINDOWS * (leaves * 24 + 64) + leaves * 16 + 21 * TOP_LEAVES * 40 + (1 << 20)


def _index(v: Any, n: int) -> int:
    if type(v) is not int or not 0 <= v < n:
        raise ValueError(f"{str(v)[:20]} is not an index below {n}")
    return v


def _number(v: Any) -> float:
    if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{str(v)[:20]} is not a finite count")
    return float(v)


def save(path: Path, model_id: str, n_layer: int, n_expert: int, windows: list[dict[int, float]], warn: Warn) -> Profile | None:
    """Merge a session's windows into the profile at ``path`` under an exclusive lock, atomically."""
    with locked(path):
        prof, writable = load(path, model_id, n_layer, n_expert, lambda _m: None)
        if not writable:
            warn(f"profile {path} belongs to another model: not saved")
            return None
        prof.merge(windows)
        replace_atomically(path, lambda f: f.write(json.dumps(prof.to_json(), separators=(",", ":")).encode()))
    return prof


# ---------------------------------------------------------------------- live


class Recorder:
    """Gate observer: counts leaf selections per window; at a prompt, prefetches its branch."""

    def __init__(self, residency: Residency, profile: Profile | None, n_expert: int) -> None:
        self.residency = residency
        self.profile = profile
        self.n_expert = n_expert
        self.windows: list[dict[int, float]] = []
        self._counts = np.zeros((residency.n_layer, n_expert))
        self._tokens = 0
        # Gates this observer did not see (observers paused: see gate.ObserverSwitch) are
        # recovered at each cut from the gate's own per-leaf counters: what they counted since
        # the last cut, less what this observer saw (one per gate that selected the leaf).
        self._uses_base = residency.state.uses.astype(np.int64)
        self._seen = np.zeros((residency.n_layer, n_expert), np.int64)
        self._prompt_layers_seen = -1  # >= 0 while the first layers of a prompt are being gated
        self.branch_prefetches = 0
        # Layers with paged experts (an architecture may have dense layers first, or in between):
        # tokens are counted at the first, windows cut at the last, the branch chosen at the
        # PROMPT_LAYERS-th.
        paged = sorted(residency.costs)
        self._first, self._last = paged[0], paged[-1]
        self._prompt_layer = paged[min(PROMPT_LAYERS, len(paged)) - 1]

    def start_prompt(self) -> None:
        self.cut()
        self._prompt_layers_seen = 0

    def token_unobserved(self) -> None:
        """A decoded token whose gates this observer did not see: windows still end every
        WINDOW_TOKENS tokens."""
        self._tokens += 1
        if self._tokens >= WINDOW_TOKENS:
            self.cut()

    def cut(self) -> None:
        uses = self.residency.state.uses.astype(np.int64)
        self._counts += np.maximum(uses - self._uses_base - self._seen, 0)
        self._uses_base, self._seen[:] = uses, 0
        if self._counts.any():
            nz = np.flatnonzero(self._counts)
            self.windows.append({int(k): float(self._counts.flat[k]) for k in nz})
            self._counts[:] = 0
        self._tokens = 0

    def __call__(self, layer: int, node: int, ids: np.ndarray) -> None:
        flat = ids.ravel()
        if ids.shape[0] == 1:  # one token's picks are distinct experts
            self._counts[layer][flat] += 1
            self._seen[layer, flat] += 1
        else:
            np.add.at(self._counts[layer], flat, 1)
            self._seen[layer, np.unique(flat)] += 1
        if layer == self._first:
            self._tokens += ids.shape[0]
        if self._prompt_layers_seen >= 0 and layer == self._prompt_layer:
            self._prompt_layers_seen = -1
            self._prefetch_branch(layer, ids)
        if layer == self._last and self._tokens >= WINDOW_TOKENS:
            self.cut()

    def _prefetch_branch(self, layer: int, ids: np.ndarray) -> None:
        if self.profile is None:
            return
        node = self.profile.branch_for(self._counts, layer + 1)
        if node is None:
            return
        keys = [(l, e) for l, e, _s in node.leaves if l > layer]
        # the cost model: a branch's leaf is worth evicting for only if it is likelier than the bar
        evict = BRANCH_PRIORITY >= self.residency.prefetch_bar()
        self.branch_prefetches += self.residency.prefetch(keys, layer=layer, in_use=np.unique(ids).tolist(),
                                                          evict=evict, priority=BRANCH_PRIORITY, source="branch")
