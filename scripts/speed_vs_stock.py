"""Decode speed of smoe-gguf against stock llama.cpp on the same file, side by side in one run.

    python scripts/speed_vs_stock.py models/medium-qwen3moe-f16.gguf models/medium-qwen3moe-f16.pack \
        --budgets 100%,25% -n 64 --reps 2

Per repetition: stock llama.cpp (the whole model resident), then smoe-gguf at each budget, each
from a fresh load with the pack's page cache dropped first. Decode speed is the median step over
the second half of the tokens (warm); the ratio is smoe / stock within the same repetition. Also
prints start-up bytes read against the core's bytes, hit rate and shard bytes per token.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import llama_cpp

from smoe_gguf.devtools import stock
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
        llama_cpp.llama_free(c)
        llama_cpp.llama_model_free(m)


def smoe_steps(pack: str, budget: str, n: int, threads: int) -> tuple[list[float], list[int], dict]:
    with Engine(pack, budget=budget, n_ctx=512, n_threads=threads, profile=None) as e:
        steps, out = _step_times((s.token for s in e.stream(PROMPT, n + 1)), n)
        return steps, out, e.stats().as_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("pack")
    ap.add_argument("--budgets", default="100%,25%")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
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
