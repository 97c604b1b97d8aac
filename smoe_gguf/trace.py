"""Leaf-access traces: what every gate asked for, recorded live and replayed without a model.

A trace is JSON lines. The first line is a header::

    {"format": "smoe-trace", "version": 1, "n_layer": L, "n_expert": E, "n_expert_used": K,
     "leaf_cost": {"0": bytes, ...}, "total_cost": bytes, "source": "model name"}

then one line per top-k gate (one layer of one micro-batch)::

    {"pos": first token position of the micro-batch, "n": tokens in it, "l": layer,
     "ids": [[experts of each token with a row]], "e": [distinct experts selected],
     "hit": [1 if that leaf of "e" was resident, else 0]}

(the last layer of a prompt micro-batch has rows only for the tokens whose logits are wanted:
the last ones). :func:`replay` feeds the gates to a book-keeping
:class:`~smoe_gguf.residency.Residency` (the same class and policies the engine runs, without
I/O), re-cut into the micro-batches the engine would use at the replayed budget, so a policy's
choices in replay are the ones it would make live, minus what prefetching would have added.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import SmoeError

FORMAT = "smoe-trace"
VERSION = 1


class Trace:
    """Writes gate events to ``path`` (JSON lines); the engine calls :meth:`begin` per decode."""

    def __init__(self, path: str | os.PathLike[str], header: dict[str, Any]) -> None:
        self.path = Path(path)
        try:
            self._f: IO[str] | None = open(self.path, "w", encoding="utf-8")
        except OSError as e:
            raise SmoeError(f"cannot write trace {self.path}: {e.strerror}") from None
        self._f.write(json.dumps({"format": FORMAT, "version": VERSION, **header}) + "\n")
        self._next = 0  # position of the next micro-batch's first token
        self._pos = self._n = 0  # the current micro-batch: first position, tokens
        self._layer = -1  # last layer gated
        self.events = 0

    def begin(self, pos: int) -> None:
        """A decode call starts at position ``pos`` (llama.cpp may cut it into micro-batches)."""
        self._next, self._layer = pos, 1 << 30

    def gate(self, layer: int, ids: np.ndarray, experts: list[int], hit: list[bool]) -> None:
        if self._f is None:
            return
        if layer <= self._layer:  # a new micro-batch: its first layer has a row per token
            self._pos, self._n = self._next, int(ids.shape[0])
            self._next += self._n
        self._layer = layer
        self._f.write(json.dumps({"pos": self._pos, "n": self._n, "l": layer, "ids": ids.tolist(),
                                  "e": experts, "hit": [int(h) for h in hit]}, separators=(",", ":")) + "\n")
        self.events += 1

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


@dataclass
class TraceData:
    header: dict[str, Any]
    events: list[tuple[int, int, int, list[list[int]]]]  # (pos, n_tokens, layer, rows of expert ids)
    live_hits: int
    live_accesses: int

    @property
    def leaf_cost(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.header["leaf_cost"].items()}

    @property
    def total_cost(self) -> int:
        return int(self.header["total_cost"])


def load(path: str | os.PathLike[str]) -> TraceData:
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SmoeError(f"{p}: no such trace") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SmoeError(f"{p}: cannot read trace ({e})") from None
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("format") != FORMAT:
        raise SmoeError(f"{p} is not a smoe-gguf trace (record one with `smoe-gguf run --trace FILE`)")
    if header.get("version") != VERSION:
        raise SmoeError(f"{p}: trace version {header.get('version')} is not supported (this is {VERSION})")
    events = []
    hits = accesses = 0
    for i, line in enumerate(lines[1:], start=2):
        try:
            ev = json.loads(line)
            events.append((int(ev["pos"]), int(ev["n"]), int(ev["l"]), [[int(e) for e in row] for row in ev["ids"]]))
            hits += sum(ev["hit"])
            accesses += len(ev["e"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise SmoeError(f"{p}:{i}: malformed trace line") from None
    return TraceData(header, events, hits, accesses)


@dataclass
class ReplayResult:
    policy: str
    budget: int
    hits: int
    misses: int
    evictions: int
    bytes_loaded: int

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)


def replay(data: TraceData, budget: int, policy: str) -> ReplayResult:
    """Run the trace's gates through a book-keeping residency of ``budget`` bytes under ``policy``,
    in the micro-batches the engine would cut at that budget."""
    from .residency import Residency

    n_expert, n_used = int(data.header["n_expert"]), int(data.header["n_expert_used"])
    r = Residency(data.leaf_cost, n_expert, budget, policy)
    cost = data.leaf_cost
    loaded = 0
    for batch in _micro_batches(data.events):
        n = batch[0][1]
        step = r.micro_batch(n_used, n)
        for a in range(0, n, step):
            for _pos, _n, layer, rows in batch:
                first = n - len(rows)  # rows belong to the batch's last len(rows) tokens
                chunk = rows[max(a - first, 0) : max(a + step - first, 0)]
                if not chunk:
                    continue
                before = r.stats.leaves_loaded
                r.on_experts(layer, np.asarray(chunk, np.int32))
                loaded += (r.stats.leaves_loaded - before) * cost[layer]
    s = r.stats
    return ReplayResult(policy, budget, s.hits, s.misses, s.evictions, loaded)


def _micro_batches(events: list[tuple[int, int, int, list[list[int]]]]) -> list[list[tuple[int, int, int, list[list[int]]]]]:
    """Consecutive gates of one micro-batch (same position and size, layers ascending)."""
    batches: list[list[tuple[int, int, int, list[list[int]]]]] = []
    for ev in events:
        last = batches[-1][-1] if batches else None
        if last is not None and (last[0], last[1]) == (ev[0], ev[1]) and ev[2] > last[2]:
            batches[-1].append(ev)
        else:
            batches.append([ev])
    return batches
