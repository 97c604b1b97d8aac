"""What the residency counts: hits, misses, loads, prefetches, evictions, stalls, peak bytes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PrefetchCounts:
    """One source of prefetches (speculation, prompt read-ahead, the tree-map...): what it queued
    and what came of it. ``stall_saved_seconds``: for each prefetched leaf a gate used, the time a
    gate load of a leaf takes (the mean measured in this session), less any wait for it."""

    queued: int = 0
    used: int = 0  # landed (or being read) when a gate needed it
    late: int = 0  # ... of which the gate waited for its read to end
    wasted: int = 0  # evicted before any gate used it
    cancelled: int = 0  # dropped from the queue to make room for a gate
    claimed: int = 0  # still queued when a gate needed it: the gate read it itself
    stall_saved_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stall_saved_seconds"] = round(self.stall_saved_seconds, 4)
        return d


@dataclass
class ResidencyStats:
    hits: int = 0  # leaves found resident by a gate seen in Python (the C path counts its own)
    misses: int = 0  # leaves a gate needed that were not resident (loaded or waited for)
    late: int = 0  # ... of which a prefetch was already bringing in
    leaves_loaded: int = 0  # by the gate's thread
    prefetched: int = 0  # leaves loaded by the I/O threads
    prefetch_wasted: int = 0  # prefetched leaves evicted before any gate used them
    prefetch_cancelled: int = 0  # queued prefetches dropped to make room for a gate
    evictions: int = 0
    stall_seconds: float = 0.0  # time the gate spent bringing leaves in or waiting for them
    load_seconds: float = 0.0  # ... of which reading the leaves it loaded itself (leaves_loaded)
    regrets: int = 0  # misses on a leaf evicted within the last REGRET_TOKENS passes over the layers
    protect_dropped: int = 0  # gates that evicted predicted leaves: nothing else could go
    down_stall_seconds: float = 0.0  # ... of which waiting for down parts (pipelining)
    down_nodes: int = 0  # layer passes whose down node the gate stopped at (down parts in flight)
    split_loads: int = 0  # leaves a prompt micro-batch's gate read part by part (gate/up, then down)
    split_rereads: int = 0  # ... of which were resident, evicted to make room for the others' gate/up parts
    down_ahead: int = 0  # ... whose down parts were read ahead, during their gate/up matmuls
    up_ahead: int = 0  # leaves whose gate/up parts were read ahead, during the layer before's down matmul
    up_ahead_used: int = 0  # ... of which the gate then selected
    peak_bytes: int = 0  # peak of charged bytes (resident + in flight)
    gates: int = 0
    native_gates: int = 0  # ... with a miss, served by the native pager
    native_fallbacks: int = 0  # ... with a miss the native pager left to Python
    moved_bytes: int = 0  # evicted pages handed to the leaf that replaced them
    per_layer_misses: dict[int, int] = field(default_factory=dict)
    per_layer_stall: dict[int, float] = field(default_factory=dict)
    token_stalls: list[float] = field(default_factory=list)  # stall of each single-token decode
    by_source: dict[str, PrefetchCounts] = field(default_factory=dict)

    def stalled(self, layer: int, seconds: float, down: bool = False) -> None:
        """Count ``seconds`` the gate's thread waited at ``layer`` (``down``: at its down node)."""
        self.stall_seconds += seconds
        self.per_layer_stall[layer] = self.per_layer_stall.get(layer, 0.0) + seconds
        if down:
            self.down_stall_seconds += seconds

    def source(self, name: str) -> PrefetchCounts:
        c = self.by_source.get(name)
        if c is None:
            c = self.by_source[name] = PrefetchCounts()
        return c

    @property
    def stall_saved_seconds(self) -> float:
        return sum(c.stall_saved_seconds for c in self.by_source.values())

    @property
    def seconds_per_load(self) -> float:
        """Mean time the gate's thread took to read one leaf (0 before the first)."""
        return self.load_seconds / self.leaves_loaded if self.leaves_loaded else 0.0
