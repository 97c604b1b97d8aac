"""A llama.cpp built with a GPU backend (skipped on CPU builds): with every layer's dense part on
the GPU and the routed experts in the X-Slot, computed by the CPU, the output equals stock
llama.cpp's with the same placement (``-ot exps=CPU``), bit for bit."""

from __future__ import annotations

import re

import llama_cpp
import pytest

from smoe_gguf import llama_session as ls
from smoe_gguf.devtools import stock
from smoe_gguf.devtools.testmodels import ARCHS
from smoe_gguf.engine import Engine

from .engine_helpers import N_TOKENS, PROMPT, same

pytestmark = pytest.mark.skipif(not llama_cpp.llama_supports_gpu_offload(),
                                reason="llama.cpp is built without a GPU backend")

ALL = -1  # n_gpu_layers: every layer


@pytest.mark.parametrize("arch", ARCHS)
def test_core_on_the_gpu_experts_paged_bit_exact(arch: str, tiny_model, pack_of, capsys) -> None:
    src, pack = tiny_model(arch, "f16"), pack_of(arch, "f16")
    capsys.readouterr()
    ls.LOG.echo = True
    try:
        with Engine(pack, budget="25%", n_ctx=256, n_threads=2, n_gpu_layers=ALL) as eng:
            log = capsys.readouterr().err
            gen = eng.generate(PROMPT, N_TOKENS, keep_logits=True)
            assert eng.residency.stats.evictions > 0 and eng.residency.stats.peak_bytes <= eng.budget
            n_batch, n_ubatch = eng.n_batch, eng.n_ubatch
    finally:
        ls.LOG.echo = False
    done = re.search(r"offloaded (\d+)/(\d+) layers to GPU", log)
    assert done is not None and done.group(1) == done.group(2), "llama.cpp did not put every layer on the GPU"
    ref = stock.greedy(src, PROMPT, n_tokens=N_TOKENS, n_batch=n_batch, n_ubatch=n_ubatch, plain_experts=True,
                       n_gpu_layers=ALL)
    assert same(ref, gen.tokens, gen.logits), f"{arch}: core on the GPU differs from stock"
    # control: the same run on the CPU alone computes other bits, so the comparison above saw the GPU's
    cpu = stock.greedy(src, PROMPT, n_tokens=N_TOKENS, n_batch=n_batch, n_ubatch=n_ubatch, plain_experts=True)
    assert not same(cpu, gen.tokens, gen.logits)
