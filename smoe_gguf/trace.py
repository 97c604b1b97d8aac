"""Leaf-access traces: what every gate asked for, recorded live and replayed without a model.

A trace is JSON lines. The first line is a header::

    {"format": "smoe-trace", "version": 1, "n_layer": L, "n_expert": E, "n_expert_used": K,
     "leaf_cost": {"0": bytes, ...}, "total_cost": bytes, "source": "model name",
     "stage_cost": {"0": [gate/up bytes, down bytes], ...}}

(``"stage_cost"``, where leaves can be served one stage at a time, is absent from traces
recorded before it was: they replay with whole leaves only.)

then one line per top-k gate (one layer of one micro-batch)::

    {"pos": first token position of the micro-batch, "n": tokens in it, "l": layer,
     "ids": [[experts of each token with a row]], "e": [distinct experts selected],
     "hit": [1 if that leaf of "e" was resident, else 0], "p": 1 if a prompt's, else 0}

(``"p"`` is absent from traces recorded before it was: read as ``n > 1``.)

(the last layer of a prompt micro-batch has rows only for the tokens whose logits are wanted:
the last ones). :func:`smoe_gguf.replay.replay` runs a loaded trace without a model.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import SmoeError
from .moe import MAX_EXPERTS, MAX_LAYERS
from .safeio import open_regular

FORMAT = "smoe-trace"
VERSION = 1


class Trace:
    """Writes gate events to ``path`` (JSON lines); the engine calls :meth:`begin` per decode."""

    def __init__(self, path: str | os.PathLike[str], header: dict[str, Any]) -> None:
        self.path = Path(path)
        refuse_overwrite(self.path)
        try:
            self._f: IO[str] | None = open(self.path, "w", encoding="utf-8")
        except OSError as e:
            raise SmoeError(f"cannot write trace {self.path}: {e.strerror}") from None
        self._write(json.dumps({"format": FORMAT, "version": VERSION, **header}) + "\n")
        self._next = 0  # position of the next micro-batch's first token
        self._pos = self._n = 0  # the current micro-batch: first position, tokens
        self._layer = -1  # last layer gated
        self.events = 0

    def begin(self, pos: int) -> None:
        """A decode call starts at position ``pos`` (llama.cpp may cut it into micro-batches)."""
        self._next, self._layer = pos, 1 << 30

    def gate(self, layer: int, ids: np.ndarray, experts: list[int], hit: list[bool], prompt: bool) -> None:
        if self._f is None:
            return
        if layer <= self._layer:  # a new micro-batch: its first layer has a row per token
            self._pos, self._n = self._next, int(ids.shape[0])
            self._next += self._n
        self._layer = layer
        self._write(json.dumps({"pos": self._pos, "n": self._n, "l": layer, "ids": ids.tolist(),
                                "e": experts, "hit": [int(h) for h in hit], "p": int(prompt)},
                               separators=(",", ":")) + "\n")
        self.events += 1

    def _write(self, line: str) -> None:
        assert self._f is not None
        try:
            self._f.write(line)
        except OSError as e:
            self._abandon()
            raise SmoeError(f"cannot write trace {self.path}: {e.strerror}") from None

    def _abandon(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass

    def close(self) -> None:
        if self._f is not None:
            f, self._f = self._f, None
            try:
                f.close()
            except OSError as e:
                raise SmoeError(f"cannot write trace {self.path}: {e.strerror}") from None


def refuse_overwrite(path: Path) -> None:
    """A trace replaces only a trace, an empty file or a device: never another file."""
    try:
        st = path.stat()
    except OSError:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError as e:
        raise SmoeError(f"cannot write trace {path}: {e.strerror}") from None
    if not head.startswith(b'{"format": "smoe-trace"'):
        raise SmoeError(f"{path}: exists and is not a trace; not overwritten (remove it or choose another file)")


def unflagged_prompt(n_tokens: int) -> bool:
    """Whether a gate recorded without ``"p"`` (before it was recorded) was a prompt's: its
    micro-batch held several tokens."""
    return n_tokens > 1


@dataclass
class TraceData:
    header: dict[str, Any]
    events: list[tuple[int, int, int, list[list[int]]]]  # (pos, n_tokens, layer, rows of expert ids)
    live_hits: int
    live_accesses: int
    prompt: list[bool] = field(default_factory=list)  # per event: a prompt's gate (AccessState.scan)

    def __post_init__(self) -> None:
        if len(self.prompt) != len(self.events):  # not given
            self.prompt = [unflagged_prompt(ev[1]) for ev in self.events]

    @property
    def leaf_cost(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.header["leaf_cost"].items()}

    @property
    def stage_cost(self) -> dict[int, tuple[int, int]] | None:
        """Per layer, what a leaf's gate/up parts and its down parts cost on their own (None: not recorded)."""
        sc = self.header.get("stage_cost")
        return None if sc is None else {int(k): (int(v[0]), int(v[1])) for k, v in sc.items()}

    @property
    def total_cost(self) -> int:
        return int(self.header["total_cost"])


# Caps far above a real trace: a hostile one must fail fast, not fill memory.
MAX_LINE = 1 << 24
MAX_UBATCH = 1 << 16
MAX_COST = 1 << 48


def load(path: str | os.PathLike[str]) -> TraceData:
    """Read and check a trace: a header of sane counts and costs, then gate lines whose layers,
    expert ids and rows are in range. Anything else is a SmoeError naming the line."""
    p = Path(path)
    if not os.path.lexists(p):
        raise SmoeError(f"{p}: no such trace")
    fd = open_regular(p)
    try:
        with os.fdopen(fd, "rb") as f:
            return _read(f, p)
    except OSError as e:
        raise SmoeError(f"{p}: cannot read trace ({e.strerror})") from None


class _Bad(Exception):
    pass


def _int(v: Any, lo: int, hi: int, what: str) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _Bad(f"{what} is {str(v)[:40]}, expected an integer in [{lo}, {hi}]")
    return v


def _lines(f: IO[bytes], p: Path) -> Any:
    i = 0
    while line := f.readline(MAX_LINE + 1):
        i += 1
        if len(line) > MAX_LINE:
            raise SmoeError(f"{p}:{i}: line longer than {MAX_LINE} bytes")
        try:
            yield i, json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            if i == 1:
                raise SmoeError(f"{p} is not a smoe-gguf trace (record one with `smoe-gguf run --trace FILE`)") from None
            raise SmoeError(f"{p}:{i}: malformed trace line (not JSON)") from None


def _header(h: Any, p: Path) -> dict[str, Any]:
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        raise SmoeError(f"{p} is not a smoe-gguf trace (record one with `smoe-gguf run --trace FILE`)")
    if h.get("version") != VERSION:
        raise SmoeError(f"{p}: trace version {str(h.get('version'))[:40]} is not supported (this is {VERSION})")
    try:
        n_layer = _int(h.get("n_layer"), 1, MAX_LAYERS, "n_layer")
        n_expert = _int(h.get("n_expert"), 1, MAX_EXPERTS, "n_expert")
        _int(h.get("n_expert_used"), 1, n_expert, "n_expert_used")
        costs = h.get("leaf_cost")
        if not isinstance(costs, dict) or not costs:
            raise _Bad("leaf_cost is not a table of layers")
        for k, v in costs.items():
            if not (k.isascii() and k.isdigit() and int(k) < n_layer):
                raise _Bad(f"leaf_cost has layer {k[:20]!r}, outside [0, {n_layer})")
            _int(v, 1, MAX_COST, f"leaf_cost of layer {k}")
        stages = h.get("stage_cost")
        if stages is not None:
            if not isinstance(stages, dict) or set(stages) != set(costs):
                raise _Bad("stage_cost is not a table of the leaf_cost layers")
            for k, v in stages.items():
                if not isinstance(v, list) or len(v) != 2:
                    raise _Bad(f"stage_cost of layer {k} is not [gate/up bytes, down bytes]")
                c0 = _int(v[0], 1, MAX_COST, f"stage_cost of layer {k}")
                c1 = _int(v[1], 1, MAX_COST, f"stage_cost of layer {k}")
                if c0 + c1 != costs[k]:
                    raise _Bad(f"stage_cost of layer {k} makes {c0 + c1}, its leaf_cost is {costs[k]}")
        total = n_expert * sum(costs.values())
        if h.get("total_cost") != total:
            raise _Bad(f"total_cost is {str(h.get('total_cost'))[:40]}, its leaf costs make {total}")
    except _Bad as e:
        raise SmoeError(f"{p}:1: malformed trace header ({e})") from None
    return h


def _read(f: IO[bytes], p: Path) -> TraceData:
    lines = _lines(f, p)
    first = next(lines, None)
    header = _header(first[1] if first else None, p)
    n_expert, n_used = header["n_expert"], header["n_expert_used"]
    layers = {int(k) for k in header["leaf_cost"]}
    events = []
    prompt: list[bool] = []
    hits = accesses = 0
    for i, ev in lines:
        try:
            if not isinstance(ev, dict):
                raise _Bad("not an object")
            n = _int(ev.get("n"), 1, MAX_UBATCH, "n")
            layer = _int(ev.get("l"), 0, 1 << 16, "l")
            if layer not in layers:
                raise _Bad(f"layer {layer} has no leaf cost in the header")
            rows = ev.get("ids")
            if not isinstance(rows, list) or len(rows) > n:
                raise _Bad("ids is not a list of at most n rows")
            for row in rows:
                if not isinstance(row, list) or len(row) != n_used:
                    raise _Bad(f"a row of ids is not a list of {n_used} experts")
                for e in row:
                    _int(e, 0, n_expert - 1, "an expert id")
            e_list, hit = ev.get("e"), ev.get("hit")
            if not isinstance(e_list, list) or not isinstance(hit, list) or len(e_list) != len(hit):
                raise _Bad("e and hit are not lists of one length")
            for x in hit:
                _int(x, 0, 1, "a hit")
            events.append((_int(ev.get("pos"), 0, 1 << 40, "pos"), n, layer, rows))
            prompt.append(bool(_int(ev["p"], 0, 1, "p")) if "p" in ev else unflagged_prompt(n))
            hits += sum(hit)
            accesses += len(e_list)
        except _Bad as e:
            raise SmoeError(f"{p}:{i}: malformed trace line ({e})") from None
    return TraceData(header, events, hits, accesses, prompt)
