"""`make bench`: stock llama.cpp against smoe-gguf, side by side, cold, on one or more MoE models.

    python scripts/bench.py models/reference-qwen3moe.gguf models/reference-large-qwen3moe.gguf \
        --budgets 10%,25%,50%,100% -n 128

Every row decodes the same prompts (one per domain of the reference model's corpus: Python,
C headers, man pages, documentation prose) with the same sampler at the same seed, so rows that
compute the same logits give the same tokens. Rows, per model (every row is a fresh subprocess,
run after the model's pages were dropped from the page cache, so peak RSS, CPU time and memory
limits are per row):

  (a) stock llama.cpp, the model fully resident (mmap + MAP_POPULATE, experts in the plain CPU
      buffer as with ``-ot exps=CPU``: the configuration smoe-gguf is bit-exact against);
  (b) the same under a memory cgroup of what smoe-gguf's rows used at that budget (their peak RSS:
      budget + dense core + runtime; budget + core + ``--cgroup-margin`` where they failed)
      (v1 ``memory.limit_in_bytes`` or v2 ``memory.max``; "unavailable: <reason>" where neither);
  (c) smoe-gguf at each budget: reactive LRU (no speculation, no profile, no part pipelining; a
      run of its own before the others records its trace, which sends every gate through Python,
      so it is not pooled) and the full orchestrator (the best policy by replay of the reactive
      trace, next-layer speculation, a tree-map profile learnt beforehand from other prompts;
      part pipelining stays off, as in `run` by default); each ``--repeats`` times (default 3),
      reactive and orchestrator in turn, the first of each pair alternating (reactive first in
      odd runs; ``turn`` in ``repeats``: the run's place among its budget's runs), each run cold
      in a process of its own, pooled into one row (decode over all runs' tokens, TTFT and the
      rest averaged; a note gives the orchestrator's ratios run by run);
  (d) on a GPU build only: stock with the core on the GPU and experts on the CPU, and smoe-gguf
      with the core on the GPU;
  physical limits: 1 / max(active bytes per token / memory bandwidth, missed bytes per token /
      disk bandwidth): with no misses; per budget with smoe-gguf's fewest missed bytes; per budget
      with the missed bytes of Belady's MIN (the offline optimum, replayed over the reactive
      row's trace). Memory bandwidth: a numpy copy. Disk bandwidth: O_DIRECT random reads of the
      model's own leaf parts, and of whole leaves where a leaf's parts follow one another in its
      file, at 1, 2, 4, 8 and 16 concurrent readers, the fastest of them.

Outputs: a table on stdout, ``<out>/results.json``, ``<out>/report.md``, ``<out>/plot.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smoe_gguf import spin
from smoe_gguf.devtools.diskprobe import DeviceCounters, device_counters
from smoe_gguf.devtools.prompts import DOMAIN_PROMPTS, LEARN_PROMPTS
from smoe_gguf.policy import DEFAULT_POLICY

if TYPE_CHECKING:
    from smoe_gguf.devtools.diskprobe import Span

ROW_MARK = "BENCH-ROW "

PROMPTS: list[str] = list(DOMAIN_PROMPTS.values())
PROMPT_DOMAINS: list[str] = list(DOMAIN_PROMPTS)
ENERGY_NONE = "n/a (no RAPL/NVML)"
LIMIT_NONE = "physical limit, no misses"
LIMIT_OWN = "physical limit, smoe-gguf's misses"
LIMIT_BELADY = "physical limit, Belady's misses"


# ------------------------------------------------------------------------------ pure helpers


def physical_limit_tps(active_bytes_per_token: float, missed_bytes_per_token: float,
                       mem_bw: float, disk_bw: float, overlap: bool = True) -> float:
    """Decode tok/s that memory bandwidth (every active byte read once per token) and disk
    bandwidth (every missed byte read once from disk) allow; bandwidths in bytes/s. ``overlap``:
    reads fully hidden behind compute (an upper bound: the slower of the two); else one after
    the other (their sum)."""
    return compute_limit_tps(active_bytes_per_token / mem_bw, missed_bytes_per_token, disk_bw, overlap)


def compute_limit_tps(compute_seconds_per_token: float, missed_bytes_per_token: float, disk_bw: float,
                      overlap: bool = True) -> float:
    """Decode tok/s that a compute time per token (the memory roofline's, or stock llama.cpp's
    decode with every expert resident) and disk bandwidth allow; ``overlap`` as in
    :func:`physical_limit_tps`."""
    disk = missed_bytes_per_token / disk_bw if missed_bytes_per_token else 0.0
    seconds = max(compute_seconds_per_token, disk) if overlap else compute_seconds_per_token + disk
    return 1.0 / seconds if seconds > 0 else float("inf")


MIN_BUSY_SECONDS = 1.0  # busy time below which a run's rate while busy bounds nothing (io_ticks' grain)


def rows_read_rate(rows: list[dict[str, Any]]) -> float:
    """The fastest any smoe-gguf run read the disk over its decode, run by run (``repeats``),
    O_DIRECT rows only: its bytes read per token times its tokens per second (the decode also
    computes, so the disk did at least this), and what the model's device read per second while
    it had a read in flight (:func:`disk_busy`), where counted over at least MIN_BUSY_SECONDS.
    0.0 where no run read."""
    best = 0.0
    for r in rows:
        if r.get("error") or not r.get("direct_io"):
            continue
        for x in r.get("repeats") or [r]:
            if x.get("decode_tps") and x.get("bytes_per_token"):
                best = max(best, x["decode_tps"] * x["bytes_per_token"])
            busy = disk_busy(x)
            if busy is not None and x["disk_busy_seconds"] >= MIN_BUSY_SECONDS:
                best = max(best, busy[1])
    return best


def same_tokens(mine: list[list[int]], ref: list[list[int]]) -> tuple[bool, int]:
    """Whether two runs' tokens agree, prompt by prompt, over the tokens both generated (a row
    stopped by its time cap generates fewer); and how many tokens were compared."""
    if len(mine) != len(ref):
        return False, 0
    n = 0
    for x, y in zip(mine, ref):
        k = min(len(x), len(y))
        if x[:k] != y[:k]:
            return False, n
        n += k
    return True, n


def decode_events(events: list[tuple[int, int, int, list[list[int]]]], prompt_tokens: list[int]) -> list[int] | None:
    """Indices of a trace's events that belong to decoding (positions at or after their prompt's
    length). A new prompt starts where the position goes back (the engine was reset); the
    segments are the prompts in order (a trace may stop early: a budget that holds every leaf
    stops gating). None if the trace has more segments than there are prompts."""
    out: list[int] = []
    k, last = 0, -1
    for i, (pos, _n, _layer, _rows) in enumerate(events):
        if pos < last:
            k += 1
        last = pos
        if k >= len(prompt_tokens):
            return None
        if pos >= prompt_tokens[k]:
            out.append(i)
    return out


def decode_replay(data: Any, budget: int, policy: str, prompt_tokens: list[int], leaf_bytes: dict[int, int],
                  decode_tokens: int) -> dict[str, Any] | None:
    """Replay of a row's trace under ``policy``, counted over its decode phase as the row counts
    it: hit rate, leaves missed and bytes missed per decoded token (``leaf_bytes`` per layer);
    None where the trace cannot be matched to the prompts. A budget that holds every leaf misses
    nothing while decoding (it is filled beforehand)."""
    from smoe_gguf.replay import replay

    idx = decode_events(data.events, prompt_tokens)
    if idx is None:
        return None
    if budget >= data.total_cost:  # room for every leaf: a pager fills it before decoding, as smoe-gguf does
        return {"hit_rate": 1.0, "misses": 0, "bytes_per_token": 0.0, "hit_rate_all": replay(data, budget, policy).hit_rate}
    res = replay(data, budget, policy)
    hits = sum(res.event_hits[i] for i in idx)
    misses = sum(res.event_misses[i] for i in idx)
    missed = sum(res.event_misses[i] * leaf_bytes[data.events[i][2]] for i in idx)
    return {"hit_rate": hits / (hits + misses) if hits + misses else 1.0, "misses": misses,
            "bytes_per_token": missed / decode_tokens if decode_tokens else None,
            "hit_rate_all": res.hit_rate}


def parse_budgets(text: str) -> list[str]:
    out = [b.strip() for b in text.split(",") if b.strip()]
    if not out:
        raise SystemExit("--budgets: give at least one budget, e.g. 10%,25%")
    return out


# how a repeated row pools each per-run figure (pool_runs); cpu_per_token, averaged here, is then
# derived from the summed CPU seconds and tokens where the runs give them
POOLED_FIELDS: tuple[tuple[tuple[str, ...], Callable[[list[float]], float]], ...] = (
    (("ttft_seconds", "ttft_mean_seconds", "load_seconds", "prefill_tps", "bytes_per_token", "hit_rate", "hit_rate_all",
      "stall_per_token", "cpu_per_token"), lambda v: sum(v) / len(v)),
    (("load_read_bytes", "peak_rss_bytes"), max),
    (("generated_tokens", "prompt_tokens", "prefill_bytes", "cpu_seconds", "cpu_seconds_total", "wall_seconds",
      "prefetched", "observer_pauses", "bytes_read_all", "disk_busy_seconds", "disk_device_bytes",
      "disk_window_seconds"), sum),
)


def pool_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs of it (``--repeats``): decode pooled (all tokens over all
    decode seconds), per-run figures averaged (TTFT: each run's first, coldest prompt), start-up
    reads and peak RSS at their largest, counts summed; the first run's tokens, trace figures and
    the rest; each run's own decode, TTFT, hit rate and bytes per token under ``repeats``. A run
    that failed makes the row fail. Where runs disagree on their tokens (they decode the same
    prompts with the same sampler and seed), ``repeat_tokens_same`` is false."""
    failed = next((r for r in runs if r.get("error")), None)
    if failed is not None:
        return dict(failed)
    out = dict(runs[0])
    if len(runs) == 1:
        return out
    each = [x for r in runs for x in r.get("decode_each") or []]
    secs, toks = sum(x[0] for x in each), sum(x[1] for x in each)
    out.update(decode_each=each, decode_tokens=toks, decode_tps=toks / secs if secs else None,
               full_each=[x for r in runs for x in r.get("full_each") or []])
    for keys, reduce in POOLED_FIELDS:
        for key in keys:
            vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
            if vals:
                out[key] = reduce(vals)
    if out.get("cpu_seconds") is not None and out.get("generated_tokens"):
        out["cpu_per_token"] = out["cpu_seconds"] / out["generated_tokens"]
    keep = ("decode_tps", "ttft_seconds", "hit_rate", "bytes_per_token", "traced", "turn", "after_stock",
            "disk_busy_seconds", "disk_device_bytes", "disk_window_seconds")
    out["repeats"] = [{k: r.get(k) for k in keep} for r in runs]
    if all(r.get("tokens") is not None for r in runs):
        out["repeat_tokens_same"] = all(same_tokens(r["tokens"], runs[0]["tokens"])[0] for r in runs[1:])
    return out


def budget_fraction(budget: str) -> float | None:
    return float(budget.rstrip("%")) / 100 if budget.endswith("%") else None


def _fmt(v: Any, spec: str, scale: float = 1.0, none: str = "-") -> str:
    if v is None or isinstance(v, str):
        return none if v is None else v
    return format(v * scale, spec)


COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("model", lambda r: r["model"]),
    ("row", lambda r: r["row"]),
    ("system", lambda r: r["system"]),
    ("budget", lambda r: r.get("budget") or "-"),
    ("decode tok/s", lambda r: _fmt(r.get("decode_tps"), ".2f")),
    ("tokens", lambda r: str(r["generated_tokens"]) if r.get("generated_tokens") is not None else "-"),
    ("start-up s", lambda r: _fmt(r.get("load_seconds"), ".2f")),
    ("start-up MB read", lambda r: _fmt(r.get("load_read_bytes"), ".1f", 1e-6)),
    ("prefill tok/s", lambda r: _fmt(r.get("prefill_tps"), ".1f")),
    ("TTFT s", lambda r: _fmt(r.get("ttft_seconds"), ".3f")),
    ("MB read/token", lambda r: _fmt(r.get("bytes_per_token"), ".2f", 1e-6)),
    ("hit rate", lambda r: _pct(r.get("hit_rate"))),
    ("Belady hit", lambda r: _pct(r.get("belady_hit_rate"))),
    ("stall s/token", lambda r: _fmt(r.get("stall_per_token"), ".4f")),
    ("disk busy in decode (GB/s busy)", lambda r: _disk_busy(r)),
    ("peak RSS MB", lambda r: _fmt(r.get("peak_rss_bytes"), ".0f", 1e-6)),
    ("CPU s/token", lambda r: _fmt(r.get("cpu_per_token"), ".3f")),
    ("J/token", lambda r: r.get("energy") or ENERGY_NONE),
    ("% of limit: own / Belady", lambda r: _limit_pcts(r)),
    ("% of limit at stock's compute: own", lambda r: _pct(r.get("pct_of_limit_own_stock"))),
    ("tokens = (a)", lambda r: _same(r.get("same_as_a"))),
    ("bit-exact", lambda r: _same(r.get("bit_exact"))),
]


def _same(v: Any) -> str:
    return "-" if v is None else ("yes" if v else "NO")


def _pct(v: Any) -> str:
    return f"{v * 100:.1f}%" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def disk_busy(r: dict[str, Any]) -> tuple[float, float] | None:
    """The share of decode's wall time in which the model's device had a read in flight, and
    what it read per second of that (bytes/s); None without the device's counters or time."""
    busy, read, window = (r.get(k) for k in ("disk_busy_seconds", "disk_device_bytes", "disk_window_seconds"))
    if not busy or not window or read is None:
        return None
    return busy / window, read / busy


def _disk_busy(r: dict[str, Any]) -> str:
    d = disk_busy(r)
    return "-" if d is None else f"{_pct(d[0])} ({d[1] / 1e9:.2f})"


def _limit_pcts(r: dict[str, Any]) -> str:
    own, bel = r.get("pct_of_limit_own"), r.get("pct_of_limit_belady")
    if own is None and bel is None:
        return "-"
    return f"{_pct(own)} / {_pct(bel)}"


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Each row as its table cells; a row with an error shows it in the first figure's cell."""
    out = []
    for r in rows:
        cells = [f(r) for _, f in COLUMNS]
        if r.get("error"):
            cells[4] = r["error"]
            for i in range(5, len(cells)):
                cells[i] = "-"
        out.append(cells)
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = [c for c, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for cells in table_rows(rows):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(markdown_table(rows))
        return
    t = Table(title=title)
    for c, _ in COLUMNS:
        t.add_column(c, justify="left" if c in ("model", "row", "system", "budget") else "right")
    for cells in table_rows(rows):
        t.add_row(*cells)
    Console(width=250).print(t)


def _span_size(curve: dict[str, Any]) -> str:
    lo, hi = curve["span_bytes"]
    return f"{lo >> 10} KiB" if lo == hi else f"{lo >> 10}-{hi >> 10} KiB"


def _points(curve: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v / 1e9:.2f}" for k, v in curve["bytes_per_second"].items())


def disk_curve_text(curve: dict[str, Any]) -> str:
    """One line: bytes per second at each number of concurrent readers (parts, and whole leaves
    where measured), and the best."""
    how = "O_DIRECT" if curve["direct"] else "buffered, cache dropped (no O_DIRECT here)"
    sweeps = curve.get("sweeps", 1)
    each = f", the mean of {sweeps} sweeps (up, then down)" if sweeps > 1 else ""
    whole = curve.get("leaves")
    leaves = f"; whole {_span_size(whole)} leaves {_points(whole)}" if whole else ""
    of = " of whole leaves" if curve.get("best_of") == "leaves" else ""
    rows, cap = curve.get("rows_best"), curve.get("capped")
    uses = (f"{cap / 1e9:g} (the read cap; the fastest sweep{of} {curve['best'] / 1e9:.2f}, "
            f"{curve['best_readers']} readers)" if cap else
            f"{rows / 1e9:.2f} (a smoe-gguf run's decode; the fastest sweep{of} {curve['best'] / 1e9:.2f}, "
            f"{curve['best_readers']} readers)" if rows else
            f"{curve['best'] / 1e9:.2f} (the fastest sweep{of}, {curve['best_readers']} readers)")
    return (f"{how} random reads of its {_span_size(curve)} parts, {curve['bytes_per_level'] / 2**20:.0f} MiB "
            f"per point{each}, GB/s by concurrent readers {_points(curve)}{leaves}; limit uses {uses}; "
            f"smoe-gguf rows read {curve['io_depth']} at once (--io-depth; a leaf's parts are one read)")


def training_text(gguf: Path) -> str | None:
    """How a model this project built was trained, from the record beside it (``NAME.json``;
    a widened model's names its source): its steps, and what stopped them. A model trained to a
    time cap differs from one machine to the next. None for any other model."""
    widened = ""
    for _ in range(2):
        try:
            info = json.loads(gguf.with_suffix(".json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict):
            return None
        tr = info.get("training")
        if isinstance(tr, dict) and "steps" in tr:
            planned = (info.get("train_config") or {}).get("steps")
            by = "a time cap" if tr.get("stopped_by") == "time" else "its step count"
            return (f"{widened}trained {tr['steps']}{f' of {planned}' if planned else ''} steps, "
                    f"stopped by {by} after {tr.get('seconds')} s")
        src = info.get("source")
        if not isinstance(src, str):
            return None
        gguf = gguf.parent / Path(src).name  # the source beside it, as `make large-reference` builds it
        widened = f"widened from {gguf.name}, "
    return None


def write_report(out: Path, result: dict[str, Any]) -> None:
    m = result["machine"]
    s = result["sampling"]
    lines = [
        "# smoe-gguf benchmark", "",
        f"Command: `{result['command']}`", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.1f} GiB, {m['os']}; "
        f"llama-cpp-python {m['llama_cpp']}; GPU offload: {m['gpu_offload']}.",
        f"Memory bandwidth {m['mem_bw'] / 1e9:.1f} GB/s (numpy copy, read + write counted).",
        "Disk bandwidth, per model:", "",
        *[f"- {name}: {disk_curve_text(c)}" for name, c in m.get("disk", {}).items()], "",
        *([f"Training: {'; '.join(f'{name} {t}' for name, t in m['trained'].items())}.", ""] if m.get("trained") else []),
        f"Page cache: {result['cache_drop']}. Energy: {result['energy_source']}.",
        f"Prompts: {len(result['prompts'])} x {result['n']} tokens each, one per domain "
        f"({', '.join(result.get('prompt_domains', []))}), sampled at temperature {s['temp']}, top-p {s['top_p']}, "
        f"seed {s['seed']} (the same sampler in every row).", "",
        markdown_table(result["rows"]), "",
        "Columns: decode tok/s = decode tokens / decode seconds over all prompts (a smoe-gguf row: over "
        "all its runs, --repeats; its other figures are the runs' mean, start-up MB read and peak RSS "
        "their largest, tokens their sum); start-up = loading the "
        "model and creating its context, cold, and the bytes read meanwhile; prefill tok/s = prompt "
        "tokens / prefill seconds; TTFT = the first (coldest) prompt's prefill + first token, after "
        "loading; MB read/token = bytes read from disk during decode / decode tokens (smoe-gguf: leaf "
        "bytes its store read; stock: the process's read_bytes); hit rate and stall: decode phase; "
        "Belady hit: Belady's MIN replayed over the reactive row's trace at that budget, decode phase "
        "(the same in-use protection and micro-batches); disk busy in decode: the share of decode's wall "
        "time in which the block device holding the model had a read in flight (the kernel's io_ticks; "
        "any process's reads count), and in brackets what it read per second of that; "
        "% of limit: decode tok/s against the physical "
        "limit at the row's own missed bytes per token, and at Belady's; "
        "CPU s/token = user + system CPU seconds of prompts and decode / generated tokens; peak RSS: the "
        "row's process. tokens = (a): the same tokens as row (a). bit-exact: the same tokens as stock "
        "llama.cpp with experts in the plain CPU buffer at the same n_ubatch and compute threads (smoe-gguf "
        "shrinks the micro-batch at small budgets and may compute with other thread counts; llama.cpp's "
        "logits depend on both).", "",
    ]
    if result.get("long_prompt"):
        lines += ["Long prompt (C headers, one prompt, cold): time to first token against stock resident, and "
                  "expert bytes smoe-gguf read per prompt token (smoe-gguf with `run`'s defaults, no profile).", "",
                  "| model | budget | prompt tokens | n_ubatch | TTFT s | stock resident TTFT s | x stock | "
                  "expert MB read / prompt token |", "|---|---|---|---|---|---|---|---|"]
        for r in result["long_prompt"]:
            if r.get("error"):
                lines.append(f"| {r['model']} | {r['budget']} | {r['error']} | - | - | - | - | - |")
                continue
            ratio = r["ttft_seconds"] / r["stock_ttft_seconds"] if r.get("stock_ttft_seconds") else None
            lines.append(f"| {r['model']} | {r['budget']} | {r['prompt_tokens']} | {r['n_ubatch']} | "
                         f"{_fmt(r['ttft_seconds'], '.2f')} | {_fmt(r['stock_ttft_seconds'], '.2f')} | "
                         f"{_fmt(ratio, '.1f')} | {_fmt(r['expert_bytes_per_prompt_token'], '.3f', 1e-6)} |")
        lines.append("")
    for note in result["notes"]:
        lines.append(f"- {note}")
    if result.get("plot"):
        lines += ["", f"![decode tok/s and hit rate against budget]({Path(result['plot']).name})"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


# systems drawn against the budget: (row system, label, style)
PLOT_LINES: list[tuple[str, str, dict[str, Any]]] = [
    ("stock llama.cpp, mmap, memory cgroup", "stock mmap, memory cgroup", {"marker": "s", "color": "tab:red"}),
    ("smoe-gguf reactive LRU", "smoe-gguf reactive", {"marker": "o", "color": "tab:blue"}),
    ("smoe-gguf orchestrator", "smoe-gguf orchestrator", {"marker": "^", "color": "tab:green"}),
    (LIMIT_OWN, "limit, smoe-gguf's misses", {"linestyle": "--", "color": "black"}),
    (LIMIT_BELADY, "limit, Belady's misses", {"linestyle": ":", "color": "black"}),
]


def _by_budget(rows: list[dict[str, Any]], system: str, key: str) -> tuple[list[float], list[float]]:
    pts = sorted((budget_fraction(r["budget"]) or 0.0, r.get(key)) for r in rows
                 if r["system"] == system and r.get("budget") and budget_fraction(r["budget"]) is not None
                 and isinstance(r.get(key), (int, float)) and r.get(key))
    return [x * 100 for x, _ in pts], [float(y) for _, y in pts]


def plot(out: Path, rows: list[dict[str, Any]]) -> Path | None:
    """Per model: decode tok/s (log) against budget, and hit rate against budget beside Belady's."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return None
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.5 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        mrows = [r for r in rows if r["model"] == model and not r.get("error")]
        tps, hit = axes[i]
        for r in mrows:
            if r["row"] == "a" and r.get("decode_tps"):
                tps.axhline(r["decode_tps"], color="gray", label="stock resident")
        for system, label, style in PLOT_LINES:
            xs, ys = _by_budget(mrows, system, "decode_tps")
            if xs:
                tps.plot(xs, ys, label=label, **style)
        for system, label, style in PLOT_LINES[1:3]:
            xs, ys = _by_budget(mrows, system, "hit_rate")
            if xs:
                hit.plot(xs, [y * 100 for y in ys], label=label, **style)
        xs, ys = _by_budget(mrows, "smoe-gguf reactive LRU", "belady_hit_rate")
        if xs:
            hit.plot(xs, [y * 100 for y in ys], label="Belady's MIN (offline optimum)", linestyle=":", marker="x",
                     color="black")
        tps.set_yscale("log")
        tps.set(title=f"{model}: decode tok/s", xlabel="budget, % of expert bytes", ylabel="tok/s (log)")
        hit.set(title=f"{model}: decode hit rate", xlabel="budget, % of expert bytes", ylabel="hit rate, %",
                ylim=(0, 101))
        tps.legend(fontsize=7)
        hit.legend(fontsize=7)
    fig.tight_layout()
    path = out / "plot.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ machine


def drop_file_cache(paths: Iterable[Path]) -> None:
    from smoe_gguf.store import drop_page_cache

    for p in paths:
        drop_page_cache(p)


def drop_caches(paths: Iterable[Path], mode: str) -> str:
    """Drop the page cache ("global": /proc/sys/vm/drop_caches, falling back to per-file
    posix_fadvise DONTNEED; "files": per file only). Returns how it was done."""
    paths = list(paths)
    os.sync()
    drop_file_cache(paths)
    if mode == "global":
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
            return "global (/proc/sys/vm/drop_caches) + posix_fadvise DONTNEED on the model files"
        except OSError as e:
            return f"posix_fadvise DONTNEED on the model files (drop_caches: {e.strerror})"
    return "posix_fadvise DONTNEED on the model files"


def measure_mem_bw(nbytes: int = 256 << 20, repeat: int = 3) -> float:
    import numpy as np

    a = np.ones(nbytes // 8)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best  # read + write


def measure_disk(parts: list[Span], min_bytes: int, readers: list[int]) -> dict[str, Any]:
    """The disk as the best pager would read a model (a pack or a GGUF) whose leaf parts lie at
    ``parts`` (:func:`~smoe_gguf.devtools.diskprobe.part_spans`): O_DIRECT random reads of them at
    each number of concurrent readers, cold; and where a leaf's parts
    follow one another in its file (a pack), of whole leaves too, as the pager reads a missed
    leaf's parts all at once. The limit is the fastest of both ("best"); the pager's depth
    follows the whole leaves' curve where there is one (its readers take a leaf's contiguous
    parts as one request), else the parts'."""
    from smoe_gguf.devtools.diskprobe import leaf_spans, random_read_curve

    curve = random_read_curve(parts, readers, min_bytes).as_dict()
    leaves = leaf_spans(parts)
    if len(leaves) < len(parts):
        whole = curve["leaves"] = random_read_curve(leaves, readers, min_bytes).as_dict()
        if whole["best"] > curve["best"]:
            curve["best"], curve["best_readers"], curve["best_of"] = whole["best"], whole["best_readers"], "leaves"
    return curve


def machine_info() -> dict[str, Any]:
    import llama_cpp
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": psutil.virtual_memory().total / 2**30,
        "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "llama_cpp": getattr(llama_cpp, "__version__", "?"),
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
    }


class Energy:
    """Joules from RAPL (package domains) or NVML (GPU 0); ``source`` says which, or why none."""

    def __init__(self) -> None:
        self.rapl = sorted(Path("/sys/class/powercap").glob("intel-rapl:[0-9]*/energy_uj")) \
            if Path("/sys/class/powercap").is_dir() else []
        self.rapl = [p for p in self.rapl if p.parent.name.count(":") == 1 and os.access(p, os.R_OK)]
        self.nvml: Any = None
        if not self.rapl:
            try:
                import pynvml  # type: ignore[import-not-found]

                pynvml.nvmlInit()
                self.nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
            except Exception:  # noqa: BLE001 - no NVML is an answer
                self.nvml = None
        self.source = "RAPL (CPU package)" if self.rapl else "NVML (GPU 0)" if self.nvml else ENERGY_NONE

    def read(self) -> float | None:
        if self.rapl:
            return sum(int(p.read_text()) for p in self.rapl) / 1e6
        if self.nvml:
            lib, h = self.nvml
            return lib.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3
        return None


# ------------------------------------------------------------------------------ cgroups


def own_cgroups(controller: str) -> tuple[list[str], list[str]] | str:
    """This process's cgroup paths from ``/proc/self/cgroup``: in the v1 hierarchy of
    ``controller``, and in the v2 one (each a list of at most one), or why they cannot be read."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError as e:
        return f"unavailable: /proc/self/cgroup: {e.strerror}"
    v1 = [ln.split(":", 2)[2] for ln in lines if controller in ln.split(":", 2)[1].split(",")]
    v2 = [ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")]
    return v1, v2


def make_cgroup(limit: int, name: str) -> tuple[Path | None, str]:
    """A child memory cgroup of this process's own with ``limit`` bytes: (its directory, "") or
    (None, why not)."""
    if sys.platform == "darwin":
        return None, "unavailable: macOS has no memory cgroups"
    if not sys.platform.startswith("linux"):
        return None, f"unavailable: no memory cgroups on {sys.platform}"
    own = own_cgroups("memory")
    if isinstance(own, str):
        return None, own
    v1, v2 = own
    candidates: list[tuple[Path, str]] = []
    if v1 and Path("/sys/fs/cgroup/memory").is_dir():
        candidates += [(Path("/sys/fs/cgroup/memory") / v1[0].lstrip("/"), "memory.limit_in_bytes"),
                       (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")]
    if v2 and Path("/sys/fs/cgroup/cgroup.controllers").is_file():
        candidates += [(Path("/sys/fs/cgroup") / v2[0].lstrip("/"), "memory.max")]
    if not candidates:
        return None, "unavailable: no memory cgroup controller mounted"
    reason = ""
    for parent, knob in candidates:
        d = parent / name
        try:
            d.mkdir()
        except OSError as e:
            reason = f"cannot create {d}: {e.strerror}"
            continue
        try:
            (d / knob).write_text(f"{limit}\n")
            if knob == "memory.limit_in_bytes" and (d / "memory.memsw.limit_in_bytes").exists():
                try:  # no swap here, but where there is, the limit must cover it too
                    (d / "memory.memsw.limit_in_bytes").write_text(f"{limit}\n")
                except OSError:
                    pass
            return d, ""
        except OSError as e:
            reason = f"cannot set {d / knob}: {e.strerror}"
            remove_cgroup(d)
    return None, f"unavailable: {reason}"


def disk_bound(probe: float, seen: float, cap: int | None) -> float:
    """The disk bandwidth the limits use: the probe's best, or what a run read if faster, and never
    more than a read cap (``--read-cap``), whose throttle lets bursts through faster than its rate."""
    best = max(probe, seen)
    return float(min(best, cap)) if cap else best


def parse_rate(text: str) -> int:
    """Bytes a second from ``1G``, ``500M``, ``800000000`` (decimal units, as disks are rated)."""
    t = text.strip().upper().removesuffix("/S").removesuffix("B")
    scale = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}.get(t[-1:], 1)
    try:
        rate = int(float(t[:-1] if scale > 1 else t) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad rate {text!r}: give bytes a second, e.g. 1G or 500M") from None
    if rate <= 0:
        raise argparse.ArgumentTypeError(f"bad rate {text!r}: it must be above 0")
    return rate


def whole_disk(path: Path) -> str | None:
    """``MAJ:MIN`` of the disk holding ``path`` (a partition's disk), or None where it is on none."""
    dev = os.stat(path).st_dev
    sysdir = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    try:
        if (sysdir / "partition").exists():
            sysdir = sysdir.resolve().parent
        return (sysdir / "dev").read_text().strip() or None
    except OSError:
        return None


def cap_reads(path: Path, rate: int, name: str) -> tuple[Path | None, Path | None, str]:
    """Move this process, and so every row it spawns from now on, into a child block-I/O cgroup
    whose reads from the disk holding ``path`` are throttled to ``rate`` bytes a second:
    (the cgroup, the one this process came from, "") or (None, None, why not). A disk read at
    a steady rate below its own makes rows compare without its drift (docs/bench.md);
    :func:`uncap_reads` undoes it."""
    if not sys.platform.startswith("linux"):
        return None, None, f"unavailable: no block-I/O cgroups on {sys.platform}"
    disk = whole_disk(path)
    if disk is None:
        return None, None, f"unavailable: {path} is not on a block device"
    own = own_cgroups("blkio")
    if isinstance(own, str):
        return None, None, own
    v1, v2 = own
    if v1 and Path("/sys/fs/cgroup/blkio").is_dir():
        home, knob, value = Path("/sys/fs/cgroup/blkio") / v1[0].lstrip("/"), "blkio.throttle.read_bps_device", \
            f"{disk} {rate}"
    elif v2 and Path("/sys/fs/cgroup/cgroup.controllers").is_file():
        home, knob, value = Path("/sys/fs/cgroup") / v2[0].lstrip("/"), "io.max", f"{disk} rbps={rate}"
    else:
        return None, None, "unavailable: no block-I/O cgroup controller mounted"
    d = home / name
    try:
        if knob == "io.max" and "io" not in (home / "cgroup.subtree_control").read_text().split():
            (home / "cgroup.subtree_control").write_text("+io\n")
        d.mkdir()
    except OSError as e:
        return None, None, f"unavailable: cannot create {d}: {e.strerror}"
    try:
        (d / knob).write_text(f"{value}\n")
        (d / "cgroup.procs").write_text(f"{os.getpid()}\n")
    except OSError as e:
        d.rmdir()
        return None, None, f"unavailable: cannot set {d / knob}: {e.strerror}"
    return d, home, ""


def uncap_reads(d: Path, home: Path) -> None:
    """Move this process back to ``home`` and remove the cgroup :func:`cap_reads` made."""
    try:
        (home / "cgroup.procs").write_text(f"{os.getpid()}\n")
    except OSError:
        pass
    remove_cgroup(d)


def cgroup_peak(d: Path) -> int | None:
    for knob in ("memory.max_usage_in_bytes", "memory.peak"):
        try:
            return int((d / knob).read_text())
        except (OSError, ValueError):
            continue
    return None


def remove_cgroup(d: Path) -> None:
    for _ in range(20):
        try:
            if (d / "memory.force_empty").exists():
                try:
                    (d / "memory.force_empty").write_text("0\n")
                except OSError:
                    pass
            d.rmdir()
            return
        except OSError:
            time.sleep(0.1)


# ------------------------------------------------------------------------------ row runner (child)


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _io_read() -> int:
    try:
        import psutil

        return int(psutil.Process().io_counters().read_bytes)
    except Exception:  # noqa: BLE001
        return 0


class _Meter:
    """Per-prompt timings and counters, summed over prompts."""

    def __init__(self) -> None:
        self.tokens: list[list[int]] = []
        self.prompt_tokens = 0
        self.prompt_tokens_each: list[int] = []
        self.prefill_s = 0.0
        self.decode_each: list[tuple[float, int]] = []  # per prompt: decode seconds, tokens
        self.full_each: list[bool] = []  # per prompt: every leaf resident when it started (smoe-gguf)
        self.ttft: list[float] = []
        self.decode_bytes = 0
        self.prefill_bytes = 0
        self.cpu = 0.0
        self.disk: DeviceCounters | None = None  # the model's device during decode, summed over prompts
        self.disk_seconds = 0.0  # ... over this much wall time

    @property
    def decode_s(self) -> float:
        return sum(sec for sec, _n in self.decode_each)

    @property
    def decode_tokens(self) -> int:
        return sum(n for _sec, n in self.decode_each)

    def decoded(self, seconds: float, tokens: int, read_bytes: int,
                disk: tuple[DeviceCounters, float] | None = None) -> None:
        """One prompt's decode: its seconds, tokens and bytes read from disk; ``disk``: what the
        model's device counted meanwhile, and the wall seconds it counted over."""
        self.decode_each.append((seconds, tokens))
        self.decode_bytes += read_bytes
        if disk is not None:
            self.disk = disk[0] if self.disk is None else self.disk + disk[0]
            self.disk_seconds += disk[1]

    def result(self) -> dict[str, Any]:
        n_gen = sum(len(t) for t in self.tokens)
        return {
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "prompt_tokens_each": self.prompt_tokens_each,
            "generated_tokens": n_gen,
            "decode_tokens": self.decode_tokens,
            "decode_tps": self.decode_tokens / self.decode_s if self.decode_s else None,
            "decode_each": self.decode_each,
            "full_each": self.full_each,
            "prefill_tps": self.prompt_tokens / self.prefill_s if self.prefill_s else None,
            "ttft_seconds": self.ttft[0] if self.ttft else None,
            "ttft_mean_seconds": sum(self.ttft) / len(self.ttft) if self.ttft else None,
            "bytes_per_token": self.decode_bytes / self.decode_tokens if self.decode_tokens else None,
            "prefill_bytes": self.prefill_bytes,
            "cpu_seconds": self.cpu,
            "cpu_per_token": self.cpu / n_gen if n_gen else None,
            "disk_busy_seconds": self.disk.busy_seconds if self.disk else None,
            "disk_device_bytes": self.disk.read_bytes if self.disk else None,
            "disk_window_seconds": self.disk_seconds if self.disk else None,
        }


class _DiskWindow:
    """The model's block device counted from :meth:`start` to :meth:`stop` (nothing where the
    counters cannot be read)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.at: tuple[DeviceCounters, float] | None = None

    def start(self) -> None:
        c = device_counters(self.model)
        self.at = (c, time.perf_counter()) if c is not None else None

    def stop(self) -> tuple[DeviceCounters, float] | None:
        """What the device counted since :meth:`start`, and over how many seconds; a window is
        counted once (None: no start since the last stop, or no counters)."""
        at, self.at = self.at, None
        c = device_counters(self.model)
        if c is None or at is None:
            return None
        return c - at[0], time.perf_counter() - at[1]


def _sampling(spec: dict[str, Any]) -> Any:
    from smoe_gguf.llama_session import Sampling

    return Sampling(**spec.get("sampling", {}))


def stock_resident(gguf: Path) -> dict[str, Any]:
    """A row spec's stock resident part: the whole model, experts in the plain CPU buffer, its
    weights read into memory (llama.cpp's --no-mmap; mapped from the page cache they can decode
    slower, docs/bench.md): the reference the limits and a full budget are read against."""
    return {"kind": "stock", "model": str(gguf), "plain_experts": True, "in_memory": True}


def _run_stock(spec: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp

    from smoe_gguf.devtools import stock
    from smoe_gguf.llama_session import Sampler, sample_tokens

    mp = stock.model_params(n_gpu_layers=spec.get("n_gpu_layers", 0), plain_experts=spec.get("plain_experts", True))
    if spec.get("in_memory"):  # the weights read into the process's memory (llama.cpp's --no-mmap)
        mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
    n_ubatch = spec.get("n_ubatch", 512)
    n_batch = max(512, n_ubatch)
    threads = spec["threads"] or os.cpu_count() or 2
    cp = stock.context_params(n_ctx=spec["n_ctx"], n_threads=threads, n_batch=n_batch, n_ubatch=n_ubatch,
                              n_threads_batch=spec.get("threads_batch") or threads)
    t0, io0 = time.perf_counter(), _io_read()
    model = stock.load_model(spec["model"], mp)
    ctx = stock.new_context(model, cp)
    out: dict[str, Any] = {"load_seconds": time.perf_counter() - t0, "load_read_bytes": _io_read() - io0,
                           "n_ubatch": n_ubatch, "weights": "in memory" if spec.get("in_memory") else "mmap"}
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    m = _Meter()
    disk = _DiskWindow(spec["model"])
    try:
        for prompt in spec["prompts"]:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            toks = stock.tokenize_with(vocab, prompt)
            c0, io0, t0 = _cpu_seconds(), _io_read(), time.perf_counter()
            for s in range(0, len(toks), n_batch):
                stock.decode(ctx, toks[s:s + n_batch])
            m.prefill_s += time.perf_counter() - t0
            gen: list[int] = []
            t1, io1 = time.perf_counter(), io0
            cap = spec.get("prompt_seconds")
            sampler = Sampler(ctx, _sampling(spec))
            steps = sample_tokens(lambda t: stock.decode(ctx, t), lambda: stock.last_logits(ctx, n_vocab), sampler,
                                  spec["n"], want_logits=False)  # as smoe-gguf's rows: picked in place
            try:
                for tok, _logits in steps:
                    gen.append(tok)
                    if len(gen) == 1:
                        m.ttft.append(time.perf_counter() - t0)
                        m.prefill_bytes += _io_read() - io0
                        io1, t1 = _io_read(), time.perf_counter()
                        disk.start()
                    if cap and time.perf_counter() - t1 > cap:  # decode time after the first token
                        break
            finally:
                steps.close()
                sampler.free()
            if len(gen) > 1:
                m.decoded(time.perf_counter() - t1, len(gen) - 1, _io_read() - io1, disk.stop())
            m.cpu += _cpu_seconds() - c0
            m.prompt_tokens += len(toks)
            m.prompt_tokens_each.append(len(toks))
            m.tokens.append(gen)
    finally:
        stock.free_context(ctx)
        llama_cpp.llama_model_free(model)
    out.update(m.result())
    return out


def _run_smoe(spec: dict[str, Any]) -> dict[str, Any]:
    spin.for_budget(Path(spec["model"]), spec["budget"])  # as the run commands do, before llama.cpp loads
    from smoe_gguf.engine import Engine

    t0 = time.perf_counter()
    kw = {k: spec[k] for k in ("policy", "speculate", "pipeline", "io_depth") if k in spec}
    with Engine(spec["model"], budget=spec["budget"], n_ctx=spec["n_ctx"], n_threads=spec["threads"],
                n_gpu_layers=spec.get("n_gpu_layers", 0), profile=spec.get("profile"), learn=False,
                trace=spec.get("trace"), **kw) as eng:
        out: dict[str, Any] = {"load_seconds": time.perf_counter() - t0, "load_read_bytes": eng.startup_read_bytes}
        m = _Meter()
        disk = _DiskWindow(spec["model"])
        hits = misses = 0
        stall = 0.0
        for prompt in spec["prompts"]:
            eng.reset()
            s0 = eng.stats().as_dict()
            snap: dict[str, Any] = {}
            m.full_each.append(eng.residency is not None and eng.residency.holds_everything())
            c0 = _cpu_seconds()
            cap, tp = spec.get("prompt_seconds"), 0.0
            tokens: list[int] = []
            stats = None
            steps = eng.stream(prompt, spec["n"], _sampling(spec))
            try:
                for step in steps:
                    tokens.append(step.token)
                    stats = step.stats
                    if not snap:
                        snap.update(eng.stats().as_dict())
                        tp = time.perf_counter()
                        disk.start()
                    if cap and time.perf_counter() - tp > cap:  # decode time after the first token
                        break
            finally:
                steps.close()
            window = disk.stop()
            m.cpu += _cpu_seconds() - c0
            s1 = eng.stats().as_dict()
            if stats is None:
                raise RuntimeError("the engine generated no token")
            m.tokens.append(tokens)
            m.prompt_tokens += stats.prompt_tokens
            m.prompt_tokens_each.append(stats.prompt_tokens)
            m.prefill_s += stats.prefill_seconds
            m.ttft.append(stats.ttft_seconds)
            m.prefill_bytes += snap["bytes_read"] - s0["bytes_read"]
            if stats.generated_tokens > 1:
                m.decoded(stats.decode_seconds, stats.generated_tokens - 1, s1["bytes_read"] - snap["bytes_read"], window)
                hits += s1["hits"] - snap["hits"]
                misses += s1["misses"] - snap["misses"]
                stall += s1["stall_seconds"] - snap["stall_seconds"]
        st = eng.stats().as_dict()
        out.update(m.result())
        out.update({
            "hit_rate": hits / (hits + misses) if hits + misses else 1.0,
            "stall_per_token": stall / m.decode_tokens if m.decode_tokens else None,
            "budget_bytes": st["budget_bytes"], "core_bytes": st["core_bytes"], "n_ubatch": st["n_ubatch"],
            "hit_rate_all": st["hit_rate"], "bytes_read_all": st["bytes_read"], "direct_io": st["direct_io"],
            "speculation": st.get("speculation"), "warnings": list(getattr(eng, "warnings", [])),
            "n_threads": st.get("n_threads"), "n_threads_batch": st.get("n_threads_batch"), "observer_pauses": st.get("observer_pauses"),
            "prefetched": st.get("prefetched"), "holds_every_leaf": not eng.paging,
        })
    return out


def _learn(spec: dict[str, Any]) -> dict[str, Any]:
    from smoe_gguf.engine import Engine

    with Engine(spec["model"], budget=spec["budget"], n_ctx=spec["n_ctx"], n_threads=spec["threads"],
                profile=spec["profile"], learn=True, speculate=True) as eng:
        eng.observer_switch.keep(True)  # observe every token: the route fits learn from each
        for p in spec["prompts"]:
            eng.reset()
            eng.generate(p, spec["n"])
    return {"profile": spec["profile"]}


def run_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one row in this process and return its figures (the child side of ``bench.py row``)."""
    if spec.get("cgroup"):
        Path(spec["cgroup"], "cgroup.procs").write_text(f"{os.getpid()}\n")
    energy = Energy()
    e0 = energy.read()
    kind = spec["kind"]
    out = _run_stock(spec) if kind == "stock" else _run_smoe(spec) if kind == "smoe" else _learn(spec)
    e1 = energy.read()
    if e0 is not None and e1 is not None and out.get("generated_tokens"):
        out["energy"] = f"{(e1 - e0) / out['generated_tokens']:.3f} ({energy.source}, incl. load)"
    from smoe_gguf.engine import peak_rss

    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["peak_rss_bytes"] = peak_rss()  # VmHWM: ru_maxrss carries the parent's peak across exec
    out["cpu_seconds_total"] = ru.ru_utime + ru.ru_stime
    return out


def child_main() -> None:
    """The child side of ``bench.py row``: the row's spec is read from stdin (JSON), so that every
    row's process starts with the same command line whatever its spec holds (its length would
    move where the process's stack starts)."""
    spec = json.loads(sys.stdin.read())
    try:
        res = run_row(spec)
    except Exception as e:  # noqa: BLE001 - the parent shows it in the row
        res = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(ROW_MARK + json.dumps(res) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------ parent


class Bench:
    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.a = args
        self.argv = argv
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.cache_drop = ""
        self.work = Path(tempfile.mkdtemp(prefix="smoe-bench-"))
        self.disk: dict[str, dict[str, Any]] = {}  # model -> its read curve
        self.trained: dict[str, str] = {}  # model -> how its weights were trained (the reference models)
        self.prompts: list[str] = []
        self.sampling: dict[str, Any] = {}
        self.long_rows: list[dict[str, Any]] = []  # the long-prompt rows (--long-prompt)

    def spawn(self, spec: dict[str, Any], files: list[Path], cgroup: Path | None = None) -> dict[str, Any]:
        """Drop the page cache for ``files``, run one row in a fresh process, return its figures."""
        cap = self.a.row_seconds / max(1, len(spec.get("prompts", [])) or 1) if self.a.row_seconds else None
        spec = {"threads": self.a.threads, "n_ctx": self.a.n_ctx, "prompt_seconds": cap, **spec}
        if cgroup is not None:
            spec["cgroup"] = str(cgroup)
        self.cache_drop = drop_caches(files, self.a.drop)
        cmd = [sys.executable, str(Path(__file__).resolve()), "row"]  # the spec on stdin (child_main)
        env = None
        if spec.get("kind") == "stock" and not spin.FROM_USER:
            env = {**os.environ, "GOMP_SPINCOUNT": spin.LIBGOMP_DEFAULT}  # stock as llama.cpp runs it
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, timeout=self.a.row_timeout,
                               env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {self.a.row_timeout} s"}
        wall = time.perf_counter() - t0
        for line in p.stdout.splitlines():
            if line.startswith(ROW_MARK):
                res = json.loads(line[len(ROW_MARK):])
                res["wall_seconds"] = wall
                return res
        why = "killed by the OOM killer (memory limit)" if p.returncode in (-9, 137) else f"exit {p.returncode}"
        tail = " ".join((p.stderr or "").strip().splitlines()[-2:])[-200:]
        return {"error": f"{why}{': ' + tail if tail else ''}"}

    def add(self, model: str, row: str, system: str, budget: str | None, res: dict[str, Any], **extra: Any) -> dict[str, Any]:
        r = {"model": model, "row": row, "system": system, "budget": budget, **res, **extra}
        self.rows.append(r)
        label = f"{model} ({row}) {system} {budget or ''}".strip()
        if r.get("error"):
            print(f"  {label}: {r['error']}", flush=True)
        else:
            print(f"  {label}: decode {r.get('decode_tps') or 0:.2f} tok/s, "
                  f"{(r.get('bytes_per_token') or 0) / 1e6:.2f} MB/token", flush=True)
        return r

    def run_once(self, model: str, system: str, budget: str, rep: int, spec: dict[str, Any],
                 files: list[Path]) -> dict[str, Any]:
        """One run of a row that is repeated (``--repeats``; ``rep`` 0: the reactive trace's run, not
        pooled): printed, not yet a table row."""
        res = {**self.spawn(spec, files), "traced": bool(spec.get("trace"))}
        what = res["error"] if res.get("error") else (
            f"decode {res.get('decode_tps') or 0:.2f} tok/s, TTFT {res.get('ttft_seconds') or 0:.3f} s")
        which = f"run {rep} of {self.a.repeats}" if rep else "the trace's run (not pooled)"
        print(f"  {model} {system} {budget}, {which}: {what}", flush=True)
        return res

    def repeat_note(self, name: str, budget: str, rr: dict[str, Any], ro: dict[str, Any]) -> None:
        """The orchestrator against reactive run by run, beside the pooled ratio (a note)."""
        runs = list(zip(rr.get("repeats") or [], ro.get("repeats") or []))
        if len(runs) < 2 or not rr.get("decode_tps") or not ro.get("decode_tps"):
            return

        def ratios(key: str, lower_is_better: bool = False) -> str:
            vals = [(y[key] / x[key]) ** (-1 if lower_is_better else 1) for x, y in runs if x.get(key) and y.get(key)]
            return ", ".join(f"{v:.2f}x" for v in vals)

        text = (f"{name} {budget}: orchestrator against reactive, pooled decode {ro['decode_tps'] / rr['decode_tps']:.2f}x "
                f"(run by run {ratios('decode_tps')}); first-token speed-up run by run {ratios('ttft_seconds', True)}")
        self.notes.append(text)
        print(f"  {text}", flush=True)

    def after_fill(self, name: str, budget: str, r: dict[str, Any], stock: dict[str, Any]) -> None:
        """A row whose budget holds every leaf against ``stock`` (stock resident, run right before
        each of the row's runs, pooled in the same order): decode over the whole run (the
        background fill included) and over the prompts that started with every leaf resident,
        each on the same prompts (a note; the table's decode tok/s is the whole run)."""
        full, mine, ref = r.get("full_each") or [], r.get("decode_each") or [], stock.get("decode_each") or []
        if r.get("error") or not mine or len(ref) < len(mine):
            return

        def tps(rows: list[Any], idx: list[int]) -> float:
            return sum(rows[i][1] for i in idx) / sum(rows[i][0] for i in idx)

        every = list(range(len(mine)))
        whole, whole_ref = tps(mine, every), tps(ref, every)
        r.update(decode_beside_stock_tps=whole_ref, whole_x_stock=whole / whole_ref)
        text = (f"{name} {budget} {r['system']}: decode over the whole run {whole:.2f} tok/s, {whole / whole_ref:.2f}x "
                f"stock resident's {whole_ref:.2f} run beside it")
        idx = [i for i in every if i < len(full) and full[i]]
        if idx:
            after, after_ref = tps(mine, idx), tps(ref, idx)
            r.update(decode_after_fill_tps=after, after_fill_x_stock=after / after_ref)
            text += (f"; after the background fill (prompts {', '.join(str(i + 1) for i in idx)}) {after:.2f} tok/s, "
                     f"{after / after_ref:.2f}x its {after_ref:.2f} on the same prompts")
        self.notes.append(text)
        print(f"  {text}", flush=True)

    def bench_model(self, gguf: Path, mem_bw: float) -> None:
        from smoe_gguf.devtools.diskprobe import leaf_read_bytes, part_spans
        from smoe_gguf.gguf_layout import read_layout
        from smoe_gguf.moe import analyze

        a = self.a
        name = gguf.name.removesuffix(".gguf")
        pack = gguf.with_suffix(".pack")
        source = pack if pack.is_dir() and not a.no_pack else gguf
        if source == pack:
            check_pack_source(pack, gguf)
        moe = analyze(read_layout(gguf)).require_moe()
        embd = sum(t.nbytes for t in moe.core_tensors if t.name == "token_embd.weight")
        active = moe.core_bytes - embd + moe.active_expert_bytes_per_token
        print(f"{name}: core {moe.core_bytes / 1e6:.0f} MB, experts {moe.expert_bytes / 1e6:.0f} MB, "
              f"leaf {moe.max_leaf_bytes / 2**20:.2f} MiB, active {active / 1e6:.0f} MB/token; smoe-gguf runs {source}",
              flush=True)
        spans = part_spans(source)
        curve = measure_disk(spans, a.disk_bytes, a.readers)
        io_depth = curve["io_depth"] = a.io_depth or curve.get("leaves", curve)["pager_readers"]  # reads at once
        self.disk[name] = curve
        trained = training_text(gguf)
        if trained:
            self.trained[name] = trained
        disk_bw = curve["best"]
        print(f"  disk: {disk_curve_text(curve)}", flush=True)
        leaf_bytes = leaf_read_bytes(spans)
        base = {"prompts": self.prompts, "n": a.n, "sampling": self.sampling, "io_depth": io_depth}
        stock_files = smoe_files = sorted({gguf, source})  # every row starts cold

        row_a = self.add(name, "a", "stock llama.cpp, fully resident", None,
                         self.spawn({**base, **stock_resident(gguf)}, stock_files),
                         same_as_a=True, bit_exact=True)
        # stock's tokens by (n_ubatch, compute threads): llama.cpp's sums depend on both
        threads = a.threads or os.cpu_count() or 2
        ref_tokens: dict[tuple[int, int, int], list[list[int]] | None] = {(512, threads, threads): row_a.get("tokens")}

        profile = self.work / f"{name}-profile.json"
        # learnt while paging (a budget that holds every leaf stops gating once full: nothing to learn):
        # the tree-map and the route fits, on other prompts than the rows'
        learn = self.spawn({"kind": "learn", "model": str(source), "profile": str(profile), "budget": "50%",
                            "prompts": LEARN_PROMPTS[:a.learn_prompts], "n": a.learn_tokens}, [])
        if learn.get("error"):
            self.notes.append(f"{name}: learning the orchestrator's profile failed ({learn['error']}); "
                              "the orchestrator ran without one")
        have_profile = profile.is_file()
        if not have_profile and not learn.get("error"):
            self.notes.append(f"{name}: the learning run wrote no profile; the orchestrator ran without one")

        smoe_rows: list[dict[str, Any]] = []
        belady: dict[str, dict[str, Any]] = {}
        for budget in a.budgets:
            trace = self.work / f"{name}-{budget.rstrip('%')}.trace.jsonl"
            reactive = {**base, "kind": "smoe", "model": str(source), "budget": budget, "policy": "lru",
                        "speculate": False, "profile": None, "pipeline": False}
            # the trace's run sends every gate through Python, which slows it: it is not one of the
            # pooled runs, only where the replays, Belady's figures and the orchestrator's policy come from
            tr = self.run_once(name, "smoe-gguf reactive LRU", budget, 0, {**reactive, "trace": str(trace)}, smoe_files)
            from_trace: dict[str, Any] = {"trace_run": {k: tr.get(k) for k in ("decode_tps", "ttft_seconds", "error")}}
            if tr.get("error"):
                self.notes.append(f"{name} {budget}: the reactive trace's run failed ({tr['error']}): no replays, "
                                  "no Belady figures, the orchestrator on lru")
            policy = "lru"
            if not tr.get("error") and trace.is_file():
                from smoe_gguf.policy import POLICIES
                from smoe_gguf.replay import replay
                from smoe_gguf.trace import load

                data = load(trace)
                rates = {p: replay(data, tr["budget_bytes"], p).hit_rate for p in POLICIES}
                policy = max(rates, key=lambda p: (rates[p], p == "lru"))
                from_trace["replay_hit_rates"] = rates
                opt = decode_replay(data, tr["budget_bytes"], "belady", tr["prompt_tokens_each"], leaf_bytes,
                                    tr["decode_tokens"])
                if opt is None:
                    self.notes.append(f"{name} {budget}: the reactive trace does not match its prompts; no Belady figures")
                else:
                    belady[budget] = opt
                    rates["belady"] = opt["hit_rate_all"]
                    from_trace.update(belady_hit_rate=opt["hit_rate"], belady_bytes_per_token=opt["bytes_per_token"])
                trace.unlink()
            orch = {**base, "kind": "smoe", "model": str(source), "budget": budget, "policy": policy,
                    "speculate": True, "profile": str(profile) if have_profile else None, "pipeline": False}
            # a budget that holds every leaf is compared with stock resident run again beside its rows:
            # this machine's speed drifts over a bench run, more than the gap measured. Right before
            # each of their runs, so that every run follows one alike (docs/bench.md), and each row
            # is compared with its own. Known from the budget at start-up, not from whether the
            # trace run's fill finished in time.
            full = bool(tr.get("holds_every_leaf"))
            rr_runs: list[dict[str, Any]] = []
            ro_runs: list[dict[str, Any]] = []
            rr_besides: list[dict[str, Any]] = []
            ro_besides: list[dict[str, Any]] = []
            rows = (("smoe-gguf reactive LRU", reactive, rr_runs, rr_besides),
                    ("smoe-gguf orchestrator", orch, ro_runs, ro_besides))
            turn = 0
            for rep in range(1, a.repeats + 1):  # pooled below
                # the two rows take turns going first (reactive in odd runs, the orchestrator in even
                # ones), so that a drift over a budget's runs does not fall on one row
                for system, spec, runs, besides in rows if rep % 2 else rows[::-1]:
                    if full:
                        besides.append(self.spawn({**base, **stock_resident(gguf)}, stock_files))
                    turn += 1
                    runs.append({**self.run_once(name, system, budget, rep, spec, smoe_files), "turn": turn,
                                 "after_stock": full})
            rr = self.add(name, "c", "smoe-gguf reactive LRU", budget, {**pool_runs(rr_runs), **from_trace})
            ro = self.add(name, "c", "smoe-gguf orchestrator", budget, pool_runs(ro_runs), policy=policy)
            self.repeat_note(name, budget, rr, ro)
            if full:
                self.notes.append(f"{name} {budget}: the budget holds every leaf, so nothing is paged and the "
                                  "orchestrator's settings change nothing (no speculation, no tree-map read, no "
                                  "eviction): its row runs reactive's engine, so a gap between the two there is not "
                                  "the orchestrator's work")
            # the reactive trace is the orchestrator's too where both decoded the same tokens in the same micro-batches
            if budget in belady and not ro.get("error") and ro.get("n_ubatch") == rr.get("n_ubatch") \
                    and ro.get("tokens") == rr.get("tokens"):
                ro.update(belady_hit_rate=belady[budget]["hit_rate"],
                          belady_bytes_per_token=belady[budget]["bytes_per_token"])
            smoe_rows += [rr, ro]
            for r, besides in ((rr, rr_besides), (ro, ro_besides)):
                beside = pool_runs(besides) if besides else None
                if beside is not None and beside.get("error"):
                    self.notes.append(f"{name} {budget}: stock resident beside the {r['system']} runs failed: "
                                      f"{beside['error']}")
                elif beside is not None:
                    self.after_fill(name, budget, r, beside)

            budget_bytes = rr.get("budget_bytes") or ro.get("budget_bytes")
            if budget_bytes is None:
                self.add(name, "b", "stock llama.cpp, mmap, memory cgroup", budget,
                         {"error": "no smoe-gguf budget to match (its rows failed)"})
                continue
            # the memory smoe-gguf used at this budget (its peak RSS: budget, core, runtime);
            # without one, the budget + core + a margin for the runtime
            rss = [r["peak_rss_bytes"] for r in (rr, ro) if not r.get("error") and r.get("peak_rss_bytes")]
            limit = max(rss) if rss else budget_bytes + moe.core_bytes + a.cgroup_margin
            cg, why = make_cgroup(limit, f"smoe-bench-{os.getpid()}-{budget.rstrip('%')}")
            if cg is None:
                self.add(name, "b", "stock llama.cpp, mmap, memory cgroup", budget, {"error": why}, limit_bytes=limit)
                continue
            try:
                res = self.spawn({**base, "kind": "stock", "model": str(gguf), "plain_experts": True}, stock_files, cg)
                res["cgroup_peak_bytes"] = cgroup_peak(cg)
            finally:
                remove_cgroup(cg)
            self.add(name, "b", "stock llama.cpp, mmap, memory cgroup", budget, res, limit_bytes=limit)

        if llama_gpu():
            self.add(name, "d", "stock llama.cpp, core on GPU, experts on CPU", None, self.spawn(
                {**base, "kind": "stock", "model": str(gguf), "plain_experts": True, "n_gpu_layers": 999}, stock_files))
            for budget in a.budgets:
                self.add(name, "d", "smoe-gguf, core on GPU", budget, self.spawn(
                    {**base, "kind": "smoe", "model": str(source), "budget": budget, "n_gpu_layers": 999,
                     "profile": str(profile) if have_profile else None}, smoe_files))
        else:
            note = "row (d) omitted: this llama-cpp-python build has no GPU offload (CPU only)"
            if note not in self.notes:
                self.notes.append(note)

        # bit-exactness: against stock at the same n_ubatch and threads (warm: these runs are references, not rows)
        mine = [r for r in self.rows if r["model"] == name]
        for r in mine:
            if r.get("error") or r.get("tokens") is None:
                continue
            if r["row"] != "a":
                r["same_as_a"], r["tokens_compared_a"] = same_tokens(r["tokens"], row_a["tokens"]) \
                    if row_a.get("tokens") else (None, 0)
            threads = r.get("n_threads") or a.threads or os.cpu_count() or 2
            key = (r.get("n_ubatch", 512), threads, r.get("n_threads_batch") or threads)
            if r["row"] in ("c", "d") and r["system"].startswith("smoe"):
                if key not in ref_tokens:
                    ref = self.spawn({**base, "kind": "stock", "model": str(gguf), "plain_experts": True,
                                      "n_ubatch": key[0], "threads": key[1], "threads_batch": key[2],
                                      "prompt_seconds": None}, [])
                    ref_tokens[key] = ref.get("tokens")
                    if ref.get("error"):
                        self.notes.append(f"{name}: stock reference at n_ubatch {key[0]}, {key[1]}/{key[2]} threads failed: "
                                          f"{ref['error']}")
                ref_t = ref_tokens[key]
                r["bit_exact"], r["tokens_compared"] = same_tokens(r["tokens"], ref_t) if ref_t else (None, 0)
                if r.get("repeat_tokens_same") is False:  # a repeat decoded other tokens than the first run
                    r["bit_exact"] = False
                    self.notes.append(f"{name} {r['budget']} {r['system']}: its repeated runs decoded different tokens")
            elif r["row"] == "b":
                r["bit_exact"] = r["same_as_a"]

        if a.long_prompt:
            self.long_prompt_rows(name, gguf, source, stock_files, io_depth)

        # a bound must not fall below what the disk did: where a row read faster than the probe saw
        seen = rows_read_rate(smoe_rows)
        bound = disk_bound(disk_bw, seen, a.read_cap)
        if bound < max(disk_bw, seen):
            self.disk[name]["capped"] = bound
            self.notes.append(f"{name}: the limits use the read cap, {bound / 1e9:g} GB/s: the probe and the runs "
                              "read faster in the throttle's bursts than it lets through over time")
        elif seen > disk_bw:
            self.notes.append(f"{name}: a smoe-gguf run read the disk at {seen / 1e9:.2f} GB/s over its decode or while "
                              f"the disk was busy, faster than the probe's best {disk_bw / 1e9:.2f} GB/s; the limits "
                              f"use {seen / 1e9:.2f}")
            self.disk[name]["rows_best"] = seen
        disk_bw = bound
        # physical limits: no misses; per budget, smoe-gguf's fewest missed bytes per token and Belady's
        def limit(missed: float) -> dict[str, Any]:
            return {"decode_tps": physical_limit_tps(active, missed, mem_bw, disk_bw), "bytes_per_token": missed,
                    "decode_tps_serial": physical_limit_tps(active, missed, mem_bw, disk_bw, overlap=False)}

        self.add(name, "limit", LIMIT_NONE, None, limit(0.0))
        for budget in a.budgets:
            missed = [r["bytes_per_token"] for r in smoe_rows
                      if r.get("budget") == budget and r.get("bytes_per_token") is not None]
            if missed:
                self.add(name, "limit", LIMIT_OWN, budget, limit(min(missed)))
            if belady.get(budget, {}).get("bytes_per_token") is not None:
                self.add(name, "limit", LIMIT_BELADY, budget, limit(belady[budget]["bytes_per_token"]),
                         hit_rate=belady[budget]["hit_rate"])
        stock = next((r for r in mine if r["row"] == "a" and r.get("decode_tps")), None)
        for r in smoe_rows:
            if r.get("error") or not r.get("decode_tps"):
                continue
            if r.get("bytes_per_token") is not None:
                r["limit_own_tps"] = physical_limit_tps(active, r["bytes_per_token"], mem_bw, disk_bw)
                r["pct_of_limit_own"] = r["decode_tps"] / r["limit_own_tps"]
                if stock is not None:
                    r["limit_own_stock_tps"] = compute_limit_tps(1.0 / stock["decode_tps"], r["bytes_per_token"], disk_bw)
                    r["pct_of_limit_own_stock"] = r["decode_tps"] / r["limit_own_stock_tps"]
            if r.get("belady_bytes_per_token") is not None:
                r["limit_belady_tps"] = physical_limit_tps(active, r["belady_bytes_per_token"], mem_bw, disk_bw)
                r["pct_of_limit_belady"] = r["decode_tps"] / r["limit_belady_tps"]
        for r in mine:
            r.setdefault("active_bytes_per_token", active)
            r.setdefault("disk_bw", disk_bw)

    def long_prompt_rows(self, name: str, gguf: Path, source: Path, files: list[Path], io_depth: int) -> None:
        """Time to first token of a long prompt of C headers: stock resident, and smoe-gguf at each
        budget (its default policy and speculation, no profile) with the expert bytes it read per
        prompt token."""
        a = self.a
        text = long_prompt_text(gguf, a.long_prompt)
        if not text:
            self.notes.append(f"{name}: no long-prompt rows (the C headers here are shorter than {a.long_prompt} tokens)")
            return
        spec = {"prompts": [text], "n": 1, "sampling": self.sampling, "n_ctx": a.long_prompt + 256,
                "prompt_seconds": None}
        stock_res = self.spawn({**spec, **stock_resident(gguf)}, files)
        for budget in a.budgets:
            # smoe-gguf as `run` starts it by default, without a profile (a first session)
            res = self.spawn({**spec, "kind": "smoe", "model": str(source), "budget": budget, "policy": DEFAULT_POLICY,
                              "speculate": True, "profile": None, "pipeline": False, "io_depth": io_depth}, files)
            row = {"model": name, "budget": budget, "prompt_tokens": res.get("prompt_tokens"),
                   "ttft_seconds": res.get("ttft_seconds"), "stock_ttft_seconds": stock_res.get("ttft_seconds"),
                   "expert_bytes_per_prompt_token": res["prefill_bytes"] / res["prompt_tokens"]
                   if res.get("prompt_tokens") else None, "n_ubatch": res.get("n_ubatch"),
                   "error": res.get("error") or stock_res.get("error")}
            self.long_rows.append(row)
            print(f"  {name} long prompt ({row['prompt_tokens']} tokens) {budget}: TTFT {row['ttft_seconds']} s "
                  f"against stock {row['stock_ttft_seconds']} s{'; ' + row['error'] if row['error'] else ''}", flush=True)

    def run(self) -> dict[str, Any]:
        a = self.a
        self.prompts = PROMPTS[:a.prompts]
        self.sampling = {"temp": a.temp, "top_p": a.top_p, "seed": a.seed}
        models = [Path(m) for m in a.models]
        for m in models:
            if not m.is_file():
                raise SystemExit(f"no such model: {m}")
        capped: tuple[Path, Path] | None = None
        if a.read_cap:
            d, home, why = cap_reads(models[0], a.read_cap, f"smoe-bench-io-{os.getpid()}")
            if d is None or home is None:
                raise SystemExit(f"--read-cap: {why}")
            capped = (d, home)
            self.notes.append(f"reads from the disk holding {models[0]} capped at {a.read_cap / 1e9:g} GB/s for every "
                              "row and the disk probe (a block-I/O cgroup's throttle, --read-cap)")
        try:
            return self._run(models)
        finally:
            if capped is not None:
                uncap_reads(*capped)

    def _run(self, models: list[Path]) -> dict[str, Any]:
        a = self.a
        load0 = os.getloadavg()
        print("measuring memory bandwidth", flush=True)
        mem_bw = measure_mem_bw()
        machine = {**machine_info(), "mem_bw": mem_bw, "disk": self.disk, "trained": self.trained}
        print(f"memory {mem_bw / 1e9:.1f} GB/s", flush=True)
        t0 = time.perf_counter()
        for m in models:
            self.bench_model(m, mem_bw)
        energy = Energy().source
        self.notes.append(f"energy: {energy}; CPU-seconds per token are given instead" if energy == ENERGY_NONE
                          else f"energy: {energy}")
        self.notes.append(f"OpenMP spin before sleeping (GOMP_SPINCOUNT): {os.environ.get('GOMP_SPINCOUNT')} in every "
                          "row, set by the user" if spin.FROM_USER else
                          f"OpenMP spin before sleeping (GOMP_SPINCOUNT): stock rows libgomp's default "
                          f"({spin.LIBGOMP_DEFAULT}); smoe-gguf rows as the run commands choose it, libgomp's "
                          f"where the budget holds every leaf, else {spin.PAGING}")
        self.notes.append("stock resident (row (a), the runs beside a full budget's rows, the long prompt's): the "
                          "weights read into the process's memory, as llama.cpp's --no-mmap does, not mapped from "
                          "the page cache (llama.cpp's default, row (b)), which can decode slower (docs/bench.md)")
        self.notes.append("row (b): memory limit = the peak RSS of smoe-gguf's rows at that budget (budget + dense "
                          "core + its runtime: KV cache, compute buffers, Python), or where they failed the budget "
                          f"+ core + {a.cgroup_margin >> 20} MiB; llama.cpp's mmap pages are charged to it and "
                          "re-read from disk when evicted")
        self.notes.append("physical limits: 1 / max(active bytes per token / memory bandwidth, missed bytes per "
                          "token / disk bandwidth), reads fully overlapped with compute (an upper bound; "
                          "results.json also has decode_tps_serial, 1 / their sum); active = dense core without "
                          "the embedding table + the selected experts; disk bandwidth = the fastest point of the "
                          "model's read curves (its parts, and its whole leaves where they are one read), or where "
                          "faster the fastest a smoe-gguf run read over its decode (bytes per token x tok/s); "
                          "missed bytes: smoe-gguf's = the smoe-gguf row with the fewest bytes "
                          "read per token at that budget; Belady's = the leaves Belady's MIN misses while decoding "
                          "the reactive row's trace, at the bytes a read of each takes")
        self.notes.append("% of limit at stock's compute: decode tok/s against 1 / max(stock resident's seconds "
                          "per token, the row's own missed bytes per token / disk bandwidth): the same bound with "
                          "this machine's compute as stock llama.cpp measures it instead of the memory-bandwidth "
                          "roofline, which a CPU of few cores does not reach (row (a) against the limit without "
                          "misses says by how much)")
        self.notes.append("Belady's MIN is replayed over the reactive row's trace (that row sends every gate through "
                          "Python to record it); the orchestrator row shows the same figure where it decoded the "
                          "same tokens in the same micro-batches, else none")
        if a.row_seconds:
            self.notes.append(f"each row decodes for at most {a.row_seconds} s in all after each prompt's first token "
                              "(split evenly over the prompts; the tokens column says how many were generated); "
                              "token equality is checked over the tokens both runs generated")
        load1 = os.getloadavg()
        self.notes.append(f"load average (1/5/15 min) at start {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, "
                          f"at end {load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} on {os.cpu_count()} cores: "
                          "a load above the core count means other work shared the CPU and the speeds are low")
        shutil.rmtree(self.work, ignore_errors=True)
        return {
            "command": a.command or " ".join(["scripts/bench.py", *self.argv]),
            "machine": machine, "prompts": self.prompts, "prompt_domains": PROMPT_DOMAINS[:a.prompts], "n": a.n,
            "sampling": self.sampling, "budgets": a.budgets,
            "cache_drop": self.cache_drop, "energy_source": energy, "notes": self.notes,
            "seconds": time.perf_counter() - t0, "rows": self.rows, "long_prompt": self.long_rows,
        }


def long_prompt_text(gguf: Path, n_tokens: int) -> str:
    """At least ``n_tokens`` tokens (by the model's own tokenizer) of the system's C headers."""
    import llama_cpp

    from smoe_gguf.devtools.prompts import long_c_prompt
    from smoe_gguf.llama_session import load_model, model_params, tokenize_with

    params = model_params()
    params.vocab_only = True
    model = load_model(gguf, params)
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        return long_c_prompt(lambda t: len(tokenize_with(vocab, t)), n_tokens)
    finally:
        llama_cpp.llama_model_free(model)


def check_pack_source(pack: Path, gguf: Path) -> None:
    """Refuse a pack split from another file than ``gguf`` (a model rebuilt since): its rows would
    compare two different models."""
    import hashlib

    src = json.loads((pack / "manifest.json").read_text())["source"]
    h = hashlib.sha256()
    with open(gguf, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    if src["size"] != gguf.stat().st_size or src["sha256"] != h.hexdigest():
        raise SystemExit(f"{pack} was split from another {src['file']} than {gguf}: split it again "
                         f"(smoe-gguf split {gguf} -o {pack} --force)")


def llama_gpu() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "row":
        child_main()
        return {}
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="MoE GGUF files; a sibling NAME.pack is what smoe-gguf runs")
    ap.add_argument("--budgets", type=parse_budgets, default=parse_budgets("10%,25%,50%,100%"))
    ap.add_argument("-n", type=int, default=128, help="tokens generated per prompt")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS),
                    help=f"how many of the {len(PROMPTS)} prompts ({', '.join(PROMPT_DOMAINS)}, in this order)")
    ap.add_argument("--temp", type=float, default=0.8, help="sampling temperature of every row (0: greedy)")
    ap.add_argument("--top-p", type=float, default=0.95, help="top-p of every row's sampler")
    ap.add_argument("--seed", type=int, default=0, help="the sampler's seed in every row")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of each smoe-gguf row at each budget, reactive and orchestrator in turn, pooled")
    ap.add_argument("--long-prompt", type=int, default=0,
                    help="also time the first token of a prompt of this many tokens of C headers, per budget (0: off)")
    ap.add_argument("--disk-bytes", type=int, default=256 << 20, help="bytes read per point of the disk curve")
    ap.add_argument("--readers", type=lambda t: [int(x) for x in t.split(",")], default=[1, 2, 4, 8, 16],
                    help="concurrent readers at which the disk is measured, comma-separated")
    ap.add_argument("--io-depth", type=int, default=None,
                    help="parts smoe-gguf reads at once (default: the disk curve's best number of readers)")
    ap.add_argument("--threads", type=int, default=None,
                    help="compute threads (default: stock all cores, smoe-gguf its own default: one less while paging)")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--learn-prompts", type=int, default=4)
    ap.add_argument("--learn-tokens", type=int, default=16)
    ap.add_argument("--cgroup-margin", type=int, default=256 << 20,
                    help="row (b) where smoe-gguf's rows failed: bytes on top of budget + core")
    ap.add_argument("--drop", choices=("global", "files"), default="global", help="how to drop the page cache")
    ap.add_argument("--no-pack", action="store_true", help="run smoe-gguf on the GGUF even where a pack exists")
    ap.add_argument("--read-cap", type=parse_rate, default=None,
                    help="throttle reads from the models' disk to this many bytes a second (e.g. 1G) for every row, "
                         "through a block-I/O cgroup (Linux, root): rows then compare at a steady disk")
    ap.add_argument("--row-timeout", type=int, default=900, help="kill a row's process after this many seconds")
    ap.add_argument("--row-seconds", type=float, default=60.0,
                    help="stop a row's decoding after this many seconds in all, split over its prompts, counted from "
                         "each prompt's first token (0: never); keeps `make bench` bounded")
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--command", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    result = Bench(a, argv).run()
    a.out.mkdir(parents=True, exist_ok=True)
    p = plot(a.out, result["rows"])
    result["plot"] = str(p) if p else None
    (a.out / "results.json").write_text(json.dumps(result, indent=1))
    write_report(a.out, result)
    print_table(result["rows"], f"smoe-gguf bench: {len(result['prompts'])} prompts x {a.n} sampled tokens, "
                                f"cold, {result['seconds']:.0f} s")
    for note in result["notes"]:
        print(f"- {note}")
    print(f"wrote {a.out / 'results.json'}, {a.out / 'report.md'}" + (f", {p}" if p else ""))
    return result


if __name__ == "__main__":
    main()
