"""Reactive LRU against the full orchestrator, side by side in one run, at several budgets.

    python scripts/compare_orchestrator.py models/medium-qwen3moe-f16.pack --budgets 10%,25%,50% -n 64

For each budget: (1) reactive: LRU, no speculation, no profile, no part pipelining, with a trace;
(2) replay of that trace under every policy (the best one is used next); (3) the full
orchestrator: best policy + next-layer speculation + part pipelining + a tree-map profile learnt
beforehand from ``--learn-prompts`` (a private profile file, so the user's is untouched).
Prints a table, writes JSON (``--json-out``). Both systems generate the same tokens (checked).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from smoe_gguf.engine import Engine
from smoe_gguf.policy import POLICIES
from smoe_gguf.replay import replay
from smoe_gguf.trace import load

PROMPT = ("Analyze how Steve Wozniak's use of the 6502's 'zero page' addressing to optimize the Apple II's "
          "memory cycles parallels the metabolic efficiency of CRISPR-Cas9 protein binding during off-target "
          "DNA sequence searching.")
LEARN = [
    "def parse_args(argv):\n    parser = argparse.ArgumentParser()",
    "The French Revolution began in 1789 and transformed the social order of Europe.",
    "#include <stdio.h>\nint main(int argc, char **argv) {",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "SELECT customer_id, SUM(total) FROM orders GROUP BY customer_id;",
    "The 6502 processor has an 8-bit data bus and a 16-bit address bus.",
    "CRISPR-Cas9 uses a guide RNA to find a matching DNA sequence.",
    "Once upon a time there was a small village at the edge of a forest.",
]


def _run(model: str, budget: str, n: int, threads: int | None, **kw: Any) -> dict[str, Any]:
    with Engine(model, budget=budget, n_ctx=1024, n_threads=threads, **kw) as eng:
        times: list[float] = []
        tokens: list[int] = []
        t0 = time.perf_counter()
        gen = eng.generate(PROMPT, n, on_token=lambda tok, _p: (times.append(time.perf_counter()), tokens.append(tok)))
        steps = [b - a for a, b in zip(times, times[1:])]
        st = eng.stats().as_dict()
        st.update({
            "tokens": gen.tokens,
            "ttft_seconds": round(gen.stats.ttft_seconds, 3),
            "decode_tps": round(1 / statistics.median(steps), 2) if steps else 0.0,
            "decode_tps_mean": round(gen.stats.decode_tps, 2),
            "wall_seconds": round(time.perf_counter() - t0, 2),
            "bytes_per_token": int(st["bytes_read"] / max(1, len(gen.tokens))),
            "stall_per_token": round(st["stall_seconds"] / max(1, len(gen.tokens)), 4),
        })
        return st


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--budgets", default="10%,25%,50%")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="default: the engine's")
    ap.add_argument("--learn-tokens", type=int, default=32)
    ap.add_argument("--json-out", default="")
    ap.add_argument("--ablate", action="store_true",
                    help="also run the orchestrator without part pipelining and without speculation")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="smoe-compare-"))
    profile = work / "profile.json"
    con = Console()
    with con.status("learning a tree-map profile"):
        with Engine(a.model, budget="25%", n_ctx=1024, n_threads=a.threads, profile=profile, speculate=False) as eng:
            for p in LEARN:
                eng.reset()
                eng.generate(p, a.learn_tokens)
    rows: list[dict[str, Any]] = []
    for budget in [b.strip() for b in a.budgets.split(",") if b.strip()]:
        trace = work / f"trace-{budget.rstrip('%')}.jsonl"
        with con.status(f"{budget}: reactive LRU"):
            reactive = _run(a.model, budget, a.n, a.threads, policy="lru", speculate=False, profile=None,
                            pipeline=False, trace=trace)
        data = load(trace)
        rates = {p: replay(data, reactive["budget_bytes"], p).hit_rate for p in POLICIES}
        best = max(rates, key=lambda p: (rates[p], p == "lru"))
        with con.status(f"{budget}: full orchestrator ({best})"):
            full = _run(a.model, budget, a.n, a.threads, policy=best, speculate=True, profile=profile,
                        learn=False, pipeline=True)
        row = {"budget": budget, "replay_hit_rates": {p: round(r, 4) for p, r in rates.items()},
               "best_policy": best, "reactive": reactive, "orchestrator": full,
               "same_tokens": reactive["tokens"] == full["tokens"]}
        if a.ablate:
            for name, kw in (("no pipelining", {"pipeline": False, "speculate": True}),
                             ("no speculation", {"pipeline": True, "speculate": False})):
                with con.status(f"{budget}: orchestrator, {name}"):
                    row[name] = _run(a.model, budget, a.n, a.threads, policy=best, profile=profile, learn=False, **kw)
                row["same_tokens"] = row["same_tokens"] and row[name]["tokens"] == reactive["tokens"]
        rows.append(row)
    table = Table(title=f"reactive LRU vs full orchestrator: {Path(a.model).name}, {a.n} tokens, side by side")
    for col in ("budget", "system", "decode tok/s", "TTFT s", "hit rate", "MB read/token", "stall s/token",
                "down-part stall s", "spec. precision", "spec. recall", "same tokens"):
        table.add_column(col, justify="left" if col in ("budget", "system") else "right")
    systems = ("reactive", "orchestrator", "no pipelining", "no speculation")
    for r in rows:
        for name in [n for n in systems if n in r]:
            s = r[name]
            spec = s.get("speculation") or {}
            label = {"reactive": "reactive LRU", "orchestrator": f"orchestrator ({r['best_policy']})"}.get(
                name, f"orchestrator, {name}")
            table.add_row(r["budget"], label, f"{s['decode_tps']:.2f}", f"{s['ttft_seconds']:.2f}",
                          f"{s['hit_rate'] * 100:.1f}%", f"{s['bytes_per_token'] / 1e6:.1f}",
                          f"{s['stall_per_token']:.3f}", f"{s['down_stall_seconds']:.2f}",
                          f"{spec.get('precision', 0) * 100:.0f}%" if spec else "-",
                          f"{spec.get('recall', 0) * 100:.0f}%" if spec else "-", str(r["same_tokens"]))
    con.print(table)
    for r in rows:
        con.print(f"{r['budget']}: replay hit rates of the reactive trace: "
                  + ", ".join(f"{p} {v * 100:.1f}%" for p, v in r["replay_hit_rates"].items()))
    if a.json_out:
        for r in rows:
            for name in [n for n in systems if n in r]:
                r[name].pop("tokens", None)
        Path(a.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
