"""Decode speed of smoe-gguf against stock llama.cpp on the same file, side by side in one run.

    python scripts/speed_vs_stock.py models/medium-qwen3moe-f16.gguf models/medium-qwen3moe-f16.pack \
        --budgets 100%,25% -n 64 --reps 2

Per repetition: stock llama.cpp (the whole model resident), then smoe-gguf at each budget, each
from a fresh load with the pack's page cache dropped first. Decode speed is the median step over
the second half of the tokens (warm); the ratio is smoe / stock within the same repetition. Also
prints start-up bytes read against the core's bytes, hit rate and shard bytes per token.

``--full``: a budget that holds every leaf, after its fill, against stock in the same process:
both stay open, the bench's prompts alternate between them (the order swapped each time), and
each prompt's smoe / stock decode ratio is printed, then their median and mean.
``--small-pages`` keeps the X-Slot off transparent huge pages (the control for them).

    python scripts/speed_vs_stock.py models/reference-large-qwen3moe.gguf \
        models/reference-large-qwen3moe.pack --full --reps 3 -n 96
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import llama_cpp

from smoe_gguf import xslot
from smoe_gguf.devtools import stock
from smoe_gguf.devtools.prompts import DOMAIN_PROMPTS
from smoe_gguf.engine import Engine
from smoe_gguf.llama_session import Sampler, Sampling, sample_tokens
from smoe_gguf.store import drop_page_cache

PROMPT = "The quick brown fox jumps over the lazy dog, and then"


def _step_times(tokens: Iterator[int], n: int) -> tuple[list[float], list[int]]:
    """Seconds between consecutive tokens of a decode loop (each is one decode step), and the tokens."""
    steps, out = [], []
    t0 = time.perf_counter()
    for tok in tokens:
        t1 = time.perf_counter()
        if out:
            steps.append(t1 - t0)
        out.append(tok)
        t0 = t1
    return steps, out


def stock_steps(src: str, n: int, threads: int) -> tuple[list[float], list[int]]:
    m = stock.load_model(src, stock.model_params())
    c = stock.new_context(m, stock.context_params(n_ctx=512, n_threads=threads))
    sampler = Sampler(c, Sampling())
    try:
        v = llama_cpp.llama_model_get_vocab(m)
        nv = llama_cpp.llama_vocab_n_tokens(v)
        stock.decode(c, stock.tokenize_with(v, PROMPT))
        loop = sample_tokens(lambda t: stock.decode(c, t), lambda: stock.last_logits(c, nv), sampler, n + 1)
        return _step_times((tok for tok, _ in loop), n)
    finally:
        sampler.free()
        stock.free_context(c)
        llama_cpp.llama_model_free(m)


def smoe_steps(pack: str, budget: str, n: int, threads: int) -> tuple[list[float], list[int], dict]:
    with Engine(pack, budget=budget, n_ctx=512, n_threads=threads, profile=None) as e:
        steps, out = _step_times((s.token for s in e.stream(PROMPT, n + 1)), n)
        return steps, out, e.stats().as_dict()


def full_budget(src: str, pack: str, n: int, reps: int, threads: int) -> list[float]:
    """Per prompt, smoe-gguf's decode at a full budget (filled first) over stock's, alternated in
    one process (see the module's docstring)."""
    m = stock.load_model(src, stock.model_params())
    c = stock.new_context(m, stock.context_params(n_ctx=1024, n_threads=threads))
    nv = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(m))
    prompts = list(DOMAIN_PROMPTS.values())
    try:
        with Engine(pack, budget="100%", n_ctx=1024, n_threads=threads, learn=False) as e:
            for p in prompts[:2]:  # the fill
                e.reset()
                e.generate(e.tokenize(p)[:128], 32)
            e.residency.drain()
            if not e.residency.holds_everything():
                raise SystemExit("the budget did not fill")

            def run_stock(tokens: list[int]) -> float:
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(c), True)
                sampler = Sampler(c, Sampling(temp=0.8, seed=0))
                try:
                    stock.decode(c, tokens)
                    t0 = time.perf_counter()
                    got = sum(1 for _ in sample_tokens(lambda t: stock.decode(c, t), lambda: stock.last_logits(c, nv),
                                                       sampler, n))
                    return got / (time.perf_counter() - t0)
                finally:
                    sampler.free()

            def run_smoe(tokens: list[int]) -> float:
                e.reset()
                return e.generate(tokens, n, temp=0.8, seed=0).stats.decode_tps

            ratios = []
            for rep in range(reps):
                for i, p in enumerate(prompts):
                    tokens = e.tokenize(p)[:128]
                    order = (run_stock, run_smoe) if (i + rep) % 2 == 0 else (run_smoe, run_stock)
                    tps = {run: run(tokens) for run in order}
                    st, sm = tps[run_stock], tps[run_smoe]
                    ratios.append(sm / st)
                    print(f"rep {rep} prompt {i}: stock {st:.1f} tok/s, smoe {sm:.1f}, ratio {ratios[-1]:.3f}", flush=True)
            return ratios
    finally:
        stock.free_context(c)
        llama_cpp.llama_model_free(m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("pack")
    ap.add_argument("--budgets", default="100%,25%")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="a full budget after its fill, alternated with stock")
    ap.add_argument("--small-pages", action="store_true", help="keep the X-Slot off huge pages (the control)")
    a = ap.parse_args()
    if a.small_pages:
        xslot._MADV_HUGEPAGE = None
    if a.full:
        ratios = full_budget(a.source, a.pack, a.n, a.reps, a.threads)
        print(f"smoe / stock at a full budget{' (small pages)' if a.small_pages else ''}: "
              f"median {statistics.median(ratios):.3f}, mean {statistics.mean(ratios):.3f} over {len(ratios)} prompts")
        return
    for rep in range(a.reps):
        ts, ref = stock_steps(a.source, a.n, a.threads)
        ms = statistics.median(ts[a.n // 2:])
        print(f"rep {rep}: stock {1 / ms:.1f} tok/s")
        for budget in a.budgets.split(","):
            drop_page_cache(Path(a.pack))
            tx, out, st = smoe_steps(a.pack, budget, a.n, a.threads)
            mx = statistics.median(tx[a.n // 2:])
            print(f"  smoe {budget:>5}: {1 / mx:6.1f} tok/s  ratio {ms / mx:.3f}  same tokens {out == ref}  "
                  f"hit {st['hit_rate'] * 100:.1f}%  {st['bytes_read'] / (a.n + 1) / 1e6:.1f} MB read/token  "
                  f"stall {st['stall_seconds'] / (a.n + 1) * 1e3:.0f} ms/token  start-up {st['startup_seconds']:.2f} s, "
                  f"{st['startup_read_bytes'] / 2**20:.1f} MiB read (core {st['core_bytes'] / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
