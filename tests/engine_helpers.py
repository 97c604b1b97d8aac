"""What the engine tests share: the prompt, the stock reference run, the comparison, budgets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from smoe_gguf.budget import page_cost
from smoe_gguf.devtools import stock
from smoe_gguf.engine import Engine
from smoe_gguf.pack import manifest as mf

PROMPT = "The quick brown fox jumps over the lazy dog, and then"
N_TOKENS = 32


def reference(model: Path, eng: Engine) -> stock.GreedyRun:
    # Stock llama.cpp with the very micro-batch the engine uses (the engine shrinks it for small
    # budgets; llama.cpp's own logits depend on it) and its experts in the plain CPU buffer
    # (`-ot exps=CPU`: not repacked, the layout the X-Slot holds).
    return stock.greedy(model, PROMPT, n_tokens=N_TOKENS, n_batch=eng.n_batch, n_ubatch=eng.n_ubatch,
                        plain_experts=True)


def same(a: stock.GreedyRun, tokens: list[int], logits: list[np.ndarray]) -> bool:
    return a.tokens == tokens and all(np.array_equal(x, y) for x, y in zip(a.logits, logits, strict=True))


def budgets(pack: Path) -> dict[str, str | int]:
    m = mf.load(pack)
    minimum = m.n_expert_used * max(sum(page_cost(p.length) for p in lf.parts) for lf in m.leaves)
    return {"min": minimum, "25%": "25%", "100%": "100%"}
