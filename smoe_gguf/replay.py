"""Replay a recorded trace without a model: hit rates of eviction policies at other budgets.

:func:`replay` feeds the trace's gates to a book-keeping :class:`~smoe_gguf.residency.Residency`
(the same class and policies the engine runs, without I/O), re-cut into the micro-batches the
engine would use at the replayed budget (a micro-batch's leaves that do not fit whole are served
one stage at a time, where the trace records the stages' costs), so a policy's choices in replay are the ones it would
make live, minus what prefetching would have added. ``belady`` (:mod:`smoe_gguf.belady`), the
offline optimum, runs only here: it is told the whole re-cut sequence of gates beforehand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .belady import Belady
from .errors import SmoeError
from .policy import POLICIES
from .residency import Residency
from .trace import TraceData

REPLAY_POLICIES: tuple[str, ...] = (*POLICIES, Belady.name)


@dataclass
class ReplayResult:
    policy: str
    budget: int
    hits: int
    misses: int
    evictions: int
    bytes_loaded: int
    # per trace event (summed over the chunks it was re-cut into): leaves found resident, leaves loaded
    event_hits: list[int] = field(default_factory=list, repr=False)
    event_misses: list[int] = field(default_factory=list, repr=False)
    # per layer: leaves found resident, leaves loaded
    layer_hits: list[int] = field(default_factory=list, repr=False)
    layer_misses: list[int] = field(default_factory=list, repr=False)

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)


def replay(data: TraceData, budget: int, policy: str) -> ReplayResult:
    """Run the trace's gates through a book-keeping residency of ``budget`` bytes under ``policy``
    (one of :data:`REPLAY_POLICIES`), in the micro-batches the engine would cut at that budget.
    Each gate is flagged a prompt's or not (``AccessState.scan``) as it was live."""
    if policy not in REPLAY_POLICIES:
        raise SmoeError(f"unknown policy {policy!r}: choose one of {', '.join(REPLAY_POLICIES)}", 2)
    n_expert, n_used = int(data.header["n_expert"]), int(data.header["n_expert_used"])
    online = policy != Belady.name
    r = Residency(data.leaf_cost, n_expert, budget, policy if online else "lru", stage_cost=data.stage_cost)
    r.split_prompts = r.can_split  # a micro-batch's leaves that do not fit whole go one stage at a time
    gates = _recut(data.events, lambda n: r.micro_batch(n_used, n, split=r.split_prompts))
    if not online:
        r.policy = Belady([(layer, chunk) for _i, layer, chunk in gates], r.n_layer, n_expert)
    cost = data.leaf_cost
    loaded = 0
    event_hits = [0] * len(data.events)
    event_misses = [0] * len(data.events)
    layer_hits = [0] * r.n_layer
    layer_misses = [0] * r.n_layer
    s = r.stats
    for i, layer, chunk in gates:
        r.state.scan[0] = data.prompt[i]
        hits, misses, rereads = s.hits, s.misses, s.split_rereads
        r.on_experts(layer, np.asarray(chunk, np.int32))
        r.finish_layer(layer)  # the down node: down parts of leaves served one stage at a time
        event_hits[i] += s.hits - hits
        event_misses[i] += s.misses - misses
        layer_hits[layer] += s.hits - hits
        layer_misses[layer] += s.misses - misses
        loaded += (s.misses - misses + s.split_rereads - rereads) * cost[layer]
    r.finish_all()
    return ReplayResult(policy, budget, s.hits, s.misses, s.evictions, loaded, event_hits, event_misses,
                        layer_hits, layer_misses)


def _recut(events: list[tuple[int, int, int, list[list[int]]]],
           step_of: Callable[[int], int]) -> list[tuple[int, int, list[list[int]]]]:
    """The gates the engine would run, ``(event index, layer, rows)``, with each recorded
    micro-batch of ``n`` tokens cut into micro-batches of ``step_of(n)`` tokens."""
    gates: list[tuple[int, int, list[list[int]]]] = []
    i = 0
    for batch in _micro_batches(events):
        n = batch[0][1]
        step = step_of(n)
        for a in range(0, n, step):
            for j, (_pos, _n, layer, rows) in enumerate(batch):
                first = n - len(rows)  # rows belong to the batch's last len(rows) tokens
                chunk = rows[max(a - first, 0) : max(a + step - first, 0)]
                if chunk:
                    gates.append((i + j, layer, chunk))
        i += len(batch)
    return gates


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
