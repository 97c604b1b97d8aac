#!/usr/bin/env python3
"""Build the reference MoE: a small qwen3moe trained here, on text every Debian machine with
Python has, with no download (``make reference-model``).

corpus (stdlib source, C headers, man pages, package docs) -> byte-level BPE -> torch training
(wall-clock capped) -> F16 GGUF -> checks against llama.cpp (tokenizer, logits in F16 and F32,
routing) -> routing statistics -> ``<out>.gguf`` + ``<out>.json`` (+ ``<out>.loss.png``).

Everything is written under temporary names first; the ``.gguf`` is put in place last, so its
presence means the whole build finished. Needs torch: ``pip install -e '.[reference]'``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# OpenMP threads that wait by sleeping, not spinning: on a shared machine a spinning thread
# burns the CPU its partner needs (measured: 2-3x slower training under load). Before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from smoe_gguf.devtools import refmodel as rm  # noqa: E402
from smoe_gguf.devtools import stock  # noqa: E402
from smoe_gguf.errors import SmoeError  # noqa: E402

console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)

DEFAULT_OUT = Path("models/reference-qwen3moe.gguf")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT, help="the GGUF to write")
    ap.add_argument("--force", action="store_true", help="rebuild even if the output exists")
    ap.add_argument("--budget-seconds", type=float, default=1140.0,
                    help="wall-clock target for the whole build; training gets what the other stages leave")
    ap.add_argument("--reserve-seconds", type=float, default=90.0,
                    help="time kept for the stages after training (export, checks, routing statistics)")
    g = ap.add_argument_group("corpus and tokenizer")
    g.add_argument("--bytes-per-domain", type=int, default=3_000_000)
    g.add_argument("--vocab", type=int, default=4096, help="vocabulary size (bytes + merges + 3 specials)")
    g = ap.add_argument_group("model")
    g.add_argument("--layers", type=int, default=8)
    g.add_argument("--experts", type=int, default=64)
    g.add_argument("--used", type=int, default=4, help="experts per token")
    g.add_argument("--embd", type=int, default=128)
    g.add_argument("--ff", type=int, default=256, help="feed-forward width of one expert")
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--head-dim", type=int, default=32)
    g.add_argument("--dtype", choices=("f16", "f32"), default="f16")
    g = ap.add_argument_group("training")
    g.add_argument("--steps", type=int, default=1000,
                   help="at most this many steps (on 2 cores the wall-clock budget ends training first)")
    g.add_argument("--batch", type=int, default=8)
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss weight")
    g.add_argument("--eval-every", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=2)
    g = ap.add_argument_group("evaluation")
    g.add_argument("--route-tokens", type=int, default=8192, help="held-out tokens per domain for routing statistics")
    g.add_argument("--quick", action="store_true",
                   help="a tiny build to try the pipeline in about a minute (not the reference model)")
    args = ap.parse_args(argv)
    if args.quick:
        args.bytes_per_domain, args.vocab = 300_000, 1024
        args.layers, args.experts, args.embd, args.ff, args.head_dim = 4, 16, 64, 64, 16
        args.steps, args.eval_every, args.route_tokens = 30, 10, 1024
        args.budget_seconds = min(args.budget_seconds, 240.0)
    return args


# ------------------------------------------------------------------------------------------ output


def stage(t0: float, msg: str) -> None:
    console.print(f"[bold cyan][{time.monotonic() - t0:7.1f}s][/] {msg}")


def corpus_table(summary: dict[str, dict[str, int]], streams: rm.TokenStreams) -> Table:
    t = Table(title="corpus", show_edge=False)
    for c in ("domain", "train docs", "train MB", "train tokens", "held-out docs", "held-out MB", "held-out tokens"):
        t.add_column(c, justify="right")
    for dom, s in summary.items():
        t.add_row(dom, str(s["train_docs"]), f"{s['train_bytes'] / 1e6:.2f}", str(len(streams.train.get(dom, ()))),
                  str(s["heldout_docs"]), f"{s['heldout_bytes'] / 1e6:.2f}", str(len(streams.heldout.get(dom, ()))))
    return t


def loss_table(curve: list[dict[str, Any]]) -> Table:
    doms = list(curve[-1]["heldout_by_domain"])
    t = Table(title="loss curve (nats/token)", show_edge=False)
    for c in ("step", "seconds", "lr", "train", *[f"held-out {d}" for d in doms], "held-out", "balance"):
        t.add_column(c, justify="right")
    for p in curve:
        t.add_row(str(p["step"]), f"{p['seconds']:.0f}", f"{p['lr']:.2e}",
                  "-" if p["train_loss"] is None else f"{p['train_loss']:.3f}",
                  *[f"{p['heldout_by_domain'][d]:.3f}" for d in doms], f"{p['heldout_loss']:.3f}",
                  "-" if p["aux_loss"] is None else f"{p['aux_loss']:.3f}")
    return t


def check_table(checks: dict[str, dict[str, Any]]) -> Table:
    t = Table(title="llama.cpp against torch on held-out text", show_edge=False)
    for c in ("export", "positions", "max |diff|", "mean |diff|", "logit std", "top-1 agree", "routes agree",
              "loss torch", "loss llama.cpp"):
        t.add_column(c, justify="right")
    for name, c in checks.items():
        lt = np.mean([d["loss_reference"] for d in c["domains"].values()])
        ll = np.mean([d["loss_llama"] for d in c["domains"].values()])
        t.add_row(name, str(c["n_positions"]), f"{c['max_abs_diff']:.2e}", f"{c['mean_abs_diff']:.2e}",
                  f"{c['ref_logit_std']:.2f}", f"{100 * c['argmax_agreement']:.2f}%",
                  f"{100 * c['route_agreement']:.2f}%", f"{lt:.4f}", f"{ll:.4f}")
    return t


def specialisation_table(trained: dict[str, Any], untrained: dict[str, Any]) -> Table:
    """Means over layers, trained model against its initial weights."""
    t = Table(title="routing specialisation, mean over layers (held-out text)", show_edge=False)
    for c in ("figure", "trained", "untrained"):
        t.add_column(c, justify="right")

    def mean(xs: list[float]) -> float:
        return float(np.mean(xs))

    for dom in trained["domains"]:
        t.add_row(f"usage entropy {dom} (bits, max {trained['max_entropy_bits']:.0f})",
                  f"{mean(trained['domains'][dom]['usage_entropy_bits']):.3f}",
                  f"{mean(untrained['domains'][dom]['usage_entropy_bits']):.3f}")
    t.add_row("usage entropy all domains", f"{mean(trained['all_usage_entropy_bits']):.3f}",
              f"{mean(untrained['all_usage_entropy_bits']):.3f}")
    t.add_row("mutual information domain/expert (bits)",
              f"{trained['domain_expert_mutual_information_bits_mean']:.3f}",
              f"{untrained['domain_expert_mutual_information_bits_mean']:.3f}")
    for c in (str(x) for x in trained["lru_capacities"]):
        for g in trained["groups"]:
            t.add_row(f"LRU {c}/{trained['n_expert']} hit rate, {g}",
                      f"{100 * trained['groups'][g]['lru_hit_rate_mean'][c]:.1f}%",
                      f"{100 * untrained['groups'][g]['lru_hit_rate_mean'][c]:.1f}%")
    return t


def text_loss_curve(curve: list[dict[str, Any]], width: int = 60, height: int = 14) -> str:
    """The held-out loss (o) and train loss (+) against step, as text."""
    pts = [(p["step"], p["heldout_loss"], p["train_loss"]) for p in curve]
    vals = [v for _, h, tr in pts for v in (h, tr) if v is not None]
    lo, hi = min(vals), max(vals)
    last = max(1, pts[-1][0])
    grid = [[" "] * width for _ in range(height)]
    for step, h, tr in pts:
        x = min(width - 1, int(step / last * (width - 1)))
        for v, ch in ((tr, "+"), (h, "o")):
            if v is not None:
                y = int((hi - v) / max(hi - lo, 1e-9) * (height - 1))
                grid[y][x] = ch
    lines = [f"{hi - (hi - lo) * i / (height - 1):6.2f} |" + "".join(r) for i, r in enumerate(grid)]
    lines.append("       +" + "-" * width)
    lines.append(f"        step 0 .. {last}    o held-out   + train   (nats/token)")
    return "\n".join(lines)


def plot_loss_curve(curve: list[dict[str, Any]], path: Path, title: str) -> bool:
    """A PNG of the loss curve (train, held-out overall and per domain); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [p["step"] for p in curve]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    tr = [(p["step"], p["train_loss"]) for p in curve if p["train_loss"] is not None]
    ax.plot([s for s, _ in tr], [v for _, v in tr], "k--", label="train (all domains)")
    ax.plot(steps, [p["heldout_loss"] for p in curve], "k-", lw=2, label="held-out (mean of domains)")
    for dom in curve[-1]["heldout_by_domain"]:
        ax.plot(steps, [p["heldout_by_domain"].get(dom, np.nan) for p in curve], "-", label=f"held-out {dom}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.part")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return True


# ------------------------------------------------------------------------------------------ stages


def tokenizer_agreement(model: Path, tok: rm.Tokenizer, texts: Sequence[str]) -> dict[str, Any]:
    """How many texts llama.cpp tokenizes into exactly the ids :meth:`Tokenizer.encode` gives."""
    import llama_cpp

    params = stock.model_params()
    params.vocab_only = True
    m = stock.load_model(model, params)
    try:
        vocab = llama_cpp.llama_model_get_vocab(m)
        same = 0
        n_tokens = 0
        first_bad: str | None = None
        for t in texts:
            ours = tok.encode(t)
            if stock.tokenize_with(vocab, t) == ours:
                same += 1
            elif first_bad is None:
                first_bad = t[:200]
            n_tokens += len(ours)
    finally:
        llama_cpp.llama_model_free(m)
    return {"texts": len(texts), "identical": same, "tokens": n_tokens, "first_mismatch": first_bad}


def check_windows(streams: rm.TokenStreams, length: int) -> dict[str, list[int]]:
    """One held-out window per domain, from the middle of its held-out stream."""
    out: dict[str, list[int]] = {}
    for dom, s in streams.heldout.items():
        if len(s) >= length:
            a = (len(s) - length) // 2
            out[dom] = [int(x) for x in s[a:a + length]]
    return out


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def build(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    load0 = _loadavg()
    out: Path = args.output
    meta_path = out.with_suffix(".json")
    png_path = out.with_suffix(".loss.png")
    if out.exists() and not args.force:
        console.print(f"{out} exists (use --force to rebuild)")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    building = out.with_name(f".{out.name}.building")
    timings: dict[str, float] = {}

    def mark(name: str, since: float) -> float:
        now = time.monotonic()
        timings[name] = round(now - since, 2)
        return now

    # corpus and tokenizer
    t = time.monotonic()
    spec = rm.CorpusSpec(bytes_per_domain=args.bytes_per_domain)
    docs = rm.collect_corpus(spec)
    summary = rm.corpus_summary(docs)
    digest = rm.corpus_digest(docs)
    missing = [d for d in rm.DOMAINS if d not in summary]
    if missing:
        console.print(f"[yellow]no documents found for: {', '.join(missing)}[/]")
    t = mark("corpus", t)
    stage(t0, f"corpus: {len(docs)} documents, {sum(len(d.text.encode()) for d in docs) / 1e6:.1f} MB, "
              f"sha256 {digest[:16]}")
    train_texts = [d.text for d in docs if not d.heldout]
    tok = rm.train_tokenizer(train_texts, args.vocab)
    t = mark("tokenizer", t)
    stage(t0, f"tokenizer: {tok.n_vocab} tokens, {len(tok.merges)} merges")
    streams = rm.tokenize_corpus(docs, tok)
    t = mark("tokenize", t)
    n_train = sum(len(s) for s in streams.train.values())
    n_train_bytes = sum(s["train_bytes"] for s in summary.values())
    stage(t0, f"tokenized: {n_train} train tokens ({n_train_bytes / max(1, n_train):.2f} bytes/token), "
              f"{sum(len(s) for s in streams.heldout.values())} held-out")
    console.print(corpus_table(summary, streams))

    # training
    cfg = rm.ModelConfig(n_vocab=tok.n_vocab, n_layer=args.layers, n_embd=args.embd, n_head=args.heads,
                         n_head_kv=args.kv_heads, head_dim=args.head_dim, n_expert=args.experts,
                         n_used=args.used, n_ff_exp=args.ff, n_ctx_train=args.seq_len)
    train_seconds = max(30.0, args.budget_seconds - (time.monotonic() - t0) - args.reserve_seconds)
    tc = rm.TrainConfig(steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr,
                        aux_coef=args.aux_coef, eval_every=args.eval_every, seed=args.seed,
                        threads=args.threads, max_seconds=train_seconds)
    counts = rm.param_counts(cfg)
    stage(t0, f"training: {counts['total'] / 1e6:.1f}M parameters ({counts['experts'] / 1e6:.1f}M in "
              f"{cfg.n_layer}x{cfg.n_expert} experts, {counts['active_per_token'] / 1e6:.1f}M active per token); "
              f"at most {tc.steps} steps of {tc.batch}x{tc.seq_len} tokens or {train_seconds:.0f} s")
    with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.percentage:>3.0f}%  step {task.fields[step]}"),
                  TimeElapsedColumn(), console=console, transient=True) as prog:
        task = prog.add_task("train", total=1.0, step=0)
        result = rm.train(cfg, tc, streams, log=lambda m: prog.console.print(m),
                          on_step=lambda s, p: prog.update(task, completed=p, step=s))
    t = mark("train", t)
    stage(t0, f"trained {result.steps_done} steps ({result.tokens_seen} tokens) in {result.seconds:.0f} s, "
              f"stopped by {result.stopped_by}")
    console.print(loss_table(result.curve))

    # export, then the checks against llama.cpp on the file itself
    try:
        rm.write_gguf(building, cfg, result.weights, tok, dtype=args.dtype,
                      extra={"smoe.reference.corpus_sha256": digest})
        t = mark("export", t)
        file_bytes = building.stat().st_size
        expert_bytes = sum(int(np.prod(s)) for n, s in rm.tensor_shapes(cfg).items() if "_exps." in n) * (
            2 if args.dtype == "f16" else 4)
        stage(t0, f"wrote {file_bytes / 1e6:.1f} MB ({100 * expert_bytes / file_bytes:.1f}% routed experts)")

        held_texts = {d: [x.text for x in docs if x.heldout and x.domain == d] for d in rm.DOMAINS}
        tok_texts = [x[:4000] for d in rm.DOMAINS for x in held_texts[d][:6]]
        tok_texts += ["naïve café ½ ²  東京\t\t 123456 it's\r\n\n   end  ", "    \n\n", "x = f(a,b)  # ok\n"]
        tok_check = tokenizer_agreement(building, tok, tok_texts)
        stage(t0, f"tokenizer: llama.cpp gives the same ids for {tok_check['identical']}/{tok_check['texts']} texts "
                  f"({tok_check['tokens']} tokens)")

        windows = check_windows(streams, args.seq_len)
        checks: dict[str, dict[str, Any]] = {}
        ref_w = rm.f16_rounded(result.weights) if args.dtype == "f16" else result.weights
        checks[args.dtype] = rm.compare_with_llama(building, cfg.n_expert, cfg.n_used,
                                                   lambda ids: rm.torch_logits(ref_w, cfg, ids), windows,
                                                   n_threads=args.threads)
        if args.dtype != "f32":  # the exact check: the same weights in F32, llama.cpp sums in F32 too
            f32_path = out.with_name(f".{out.name}.f32-check")
            try:
                rm.write_gguf(f32_path, cfg, result.weights, tok, dtype="f32")
                checks["f32"] = rm.compare_with_llama(f32_path, cfg.n_expert, cfg.n_used,
                                                      lambda ids: rm.torch_logits(result.weights, cfg, ids),
                                                      windows, n_threads=args.threads)
            finally:
                f32_path.unlink(missing_ok=True)
        t = mark("logits_check", t)
        console.print(check_table(checks))

        routes = rm.route_stats(building, held_texts, max_tokens=args.route_tokens, chunk=args.seq_len,
                                n_threads=args.threads, seed=args.seed)
        routes["model"] = str(out)
        console.print("[bold]routing on held-out text (llama.cpp)[/]")
        console.print(rm.format_route_table(routes))
        # the same figures for the untrained model (initial weights): a random router already
        # separates domains somewhat, because their tokens differ; training is what adds the rest
        base_path = out.with_name(f".{out.name}.untrained")
        try:
            rm.write_gguf(base_path, cfg, rm.init_weights(cfg, tc.seed), tok, dtype=args.dtype)
            untrained = rm.route_stats(base_path, held_texts, max_tokens=args.route_tokens, chunk=args.seq_len,
                                       n_threads=args.threads, seed=args.seed)
        finally:
            base_path.unlink(missing_ok=True)
        untrained["model"] = f"initial weights (seed {tc.seed}), same tokenizer"
        t = mark("route_stats", t)
        console.print(specialisation_table(routes, untrained))

        png = plot_loss_curve(result.curve, png_path, f"reference qwen3moe {cfg.n_layer}x{cfg.n_expert} "
                                                     f"experts, top-{cfg.n_used}")
        curve_text = text_loss_curve(result.curve)
        console.print(curve_text)
        t = mark("plot", t)
        meta: dict[str, Any] = {
            "model": out.name,
            "arch": rm.ARCH,
            "dtype": args.dtype,
            "file_bytes": file_bytes,
            "expert_bytes": expert_bytes,
            "config": dataclasses.asdict(cfg),
            "params": counts,
            "train_config": dataclasses.asdict(tc),
            "corpus": {"spec": dataclasses.asdict(spec), "sha256": digest, "documents": len(docs),
                       "domains": summary,
                       "tokens": {"train": {d: int(len(s)) for d, s in streams.train.items()},
                                  "heldout": {d: int(len(s)) for d, s in streams.heldout.items()}}},
            "tokenizer": {"n_vocab": tok.n_vocab, "merges": len(tok.merges), "pre": rm.PRE_TOKENIZER,
                          "train_bytes_per_token": round(n_train_bytes / max(1, n_train), 3),
                          "llama_cpp_agreement": tok_check},
            "training": {"seconds": round(result.seconds, 1), "steps": result.steps_done,
                         "tokens_seen": result.tokens_seen, "stopped_by": result.stopped_by,
                         "threads": args.threads},
            "loss_curve": result.curve,
            "loss_curve_text": curve_text.split("\n"),
            "loss_png": png_path.name if png else None,
            "logits_check": checks,
            "route_stats": routes,
            "route_stats_untrained": untrained,
            "timings_seconds": timings,
            "build_seconds": round(time.monotonic() - t0, 1),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                        "torch": _torch_version(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                        # other work on the machine slows training; the wall-clock cap then ends it sooner
                        "load_average_at_start": load0, "load_average_at_end": _loadavg()},
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        }
        rm.save_json(meta_path, meta)
        os.replace(building, out)
    finally:
        building.unlink(missing_ok=True)
    stage(t0, f"done: {out} ({file_bytes / 1e6:.1f} MB), {meta_path}" + (f", {png_path}" if png else ""))
    return 0


def _torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return str(torch.__version__)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return build(args)
    except SmoeError as e:
        console.print(f"[red]error:[/] {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
