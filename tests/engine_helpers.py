"""What the engine tests share: the prompt, the stock reference run, the comparison, budgets, a
corrupted pack."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from smoe_gguf.budget import page_cost
from smoe_gguf.devtools import stock
from smoe_gguf.engine import Engine
from smoe_gguf.pack import manifest as mf
from smoe_gguf.pack.split import split

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


def corrupted_pack(model: Path, pack: Path, layer: int, index: int, expert: int | None = None) -> str:
    """Split ``model`` into ``pack``, then flip one byte of part ``index`` of every leaf of ``layer``
    (of ``expert``'s only, where given); that part's name."""
    split(model, pack)
    name = ""
    for leaf in mf.load(pack).leaves:
        if leaf.layer == layer and expert in (None, leaf.expert):
            path = pack / leaf.file
            data = bytearray(path.read_bytes())
            data[leaf.parts[index].offset + 5] ^= 0x01
            path.write_bytes(bytes(data))
            name = leaf.parts[index].part
    return name
