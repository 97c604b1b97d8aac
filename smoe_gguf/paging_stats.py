"""What the residency counts: hits, misses, loads, prefetches, evictions, stalls, peak bytes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ResidencyStats:
    hits: int = 0  # leaves found resident by a gate seen in Python (the C path counts its own)
    misses: int = 0  # leaves a gate needed that were not resident (loaded or waited for)
    late: int = 0  # ... of which a prefetch was already bringing in
    leaves_loaded: int = 0  # by the gate's thread
    prefetched: int = 0  # leaves loaded by the I/O thread
    prefetch_wasted: int = 0  # prefetched leaves evicted before any gate used them
    prefetch_cancelled: int = 0  # queued prefetches dropped to make room for a gate
    evictions: int = 0
    stall_seconds: float = 0.0  # time the gate spent bringing leaves in or waiting for them
    down_stall_seconds: float = 0.0  # ... of which waiting for down parts (pipelining)
    down_nodes: int = 0  # layer passes whose down node the gate stopped at (down parts in flight)
    peak_bytes: int = 0  # peak of charged bytes (resident + in flight)
    gates: int = 0
    per_layer_misses: dict[int, int] = field(default_factory=dict)
    per_layer_stall: dict[int, float] = field(default_factory=dict)
    token_stalls: list[float] = field(default_factory=list)  # stall of each single-token decode
