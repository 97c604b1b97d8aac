#!/usr/bin/env python3
"""Build the large reference MoE (``make large-reference``): the trained reference model with every
expert widened by zero neurons, so its leaves have a large model's size and its routing and
outputs stay those of the trained model.

models/reference-qwen3moe.gguf (8 layers x 64 experts, top-4, F16, 192 KiB leaves) -> each expert's
feed-forward width x16 (gate/up rows and down columns of zeros) -> 3 MiB leaves, 1.5 GiB of
experts. Then stock llama.cpp decodes the domain prompts with both models, greedy and sampled,
and the build fails unless both give the same tokens with logits within ``--tolerance`` (times the
logits' standard deviation). The widened model is written under a temporary name and put in place
only after that check; ``<out>.json`` records the check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from smoe_gguf.devtools.prompts import DOMAIN_PROMPTS
from smoe_gguf.devtools.widen import compare_models, widen_experts
from smoe_gguf.errors import SmoeError
from smoe_gguf.gguf_layout import read_layout
from smoe_gguf.moe import analyze
from smoe_gguf.pack.verify import path_sha256

DEFAULT_SRC = Path("models/reference-qwen3moe.gguf")
DEFAULT_OUT = Path("models/reference-large-qwen3moe.gguf")
MIN_LEAF = 1 << 20
MIN_EXPERTS = 3 << 29  # 1.5 GiB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("source", type=Path, nargs="?", default=DEFAULT_SRC, help="the trained reference GGUF")
    ap.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--factor", type=int, default=16, help="each expert's width is multiplied by this")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per prompt by the check")
    ap.add_argument("--temp", type=float, default=0.8, help="temperature of the sampled check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="compute threads of the check (one is fastest on a busy machine)")
    ap.add_argument("--tolerance", type=float, default=1e-3,
                    help="largest logit difference allowed, as a fraction of the logits' standard deviation")
    ap.add_argument("--force", action="store_true", help="rebuild even if the output exists")
    a = ap.parse_args(argv)
    if a.output.exists() and not a.force:
        print(f"{a.output} exists (--force to rebuild)")
        return 0
    if not a.source.is_file():
        print(f"no {a.source}: build the trained reference first (make reference-model)", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    tmp = a.output.with_name(a.output.name + ".unchecked")
    try:
        widen_experts(a.source, tmp, a.factor)
        t_widen = time.perf_counter() - t0
        src_moe = analyze(read_layout(a.source)).require_moe()
        moe = analyze(read_layout(tmp)).require_moe()
        print(f"widened x{a.factor} in {t_widen:.1f} s: leaves {src_moe.max_leaf_bytes / 2**20:.2f} -> "
              f"{moe.max_leaf_bytes / 2**20:.2f} MiB, experts {src_moe.expert_bytes / 2**30:.2f} -> "
              f"{moe.expert_bytes / 2**30:.2f} GiB, core {moe.core_bytes / 2**20:.1f} MiB", flush=True)
        if moe.max_leaf_bytes < MIN_LEAF or moe.expert_bytes < MIN_EXPERTS:
            print("note: below the large reference's target (leaves >= 1 MiB, experts >= 1.5 GiB): raise --factor",
                  file=sys.stderr)
        prompts = list(DOMAIN_PROMPTS.values())
        t1 = time.perf_counter()
        cmp = compare_models(a.source, tmp, prompts, a.tokens, temp=a.temp, seed=a.seed, n_threads=a.threads)
        t_check = time.perf_counter() - t1
        ok = cmp.same_greedy_tokens and cmp.same_sampled_tokens and cmp.max_abs_logit_diff <= a.tolerance * cmp.logit_std
        print(f"check ({len(prompts)} prompts x {a.tokens} tokens, greedy and sampled at temperature {a.temp}, "
              f"{t_check:.1f} s): same greedy tokens {cmp.same_greedy_tokens}, same sampled tokens "
              f"{cmp.same_sampled_tokens}, max |logit difference| {cmp.max_abs_logit_diff:.3g} over {cmp.positions} "
              f"positions (logit std {cmp.logit_std:.3g})", flush=True)
        report = {
            "source": str(a.source), "source_sha256": path_sha256(a.source), "factor": a.factor,
            "leaf_bytes": moe.max_leaf_bytes, "expert_bytes": moe.expert_bytes, "core_bytes": moe.core_bytes,
            "check": {**cmp.as_dict(), "temp": a.temp, "seed": a.seed, "tolerance": a.tolerance, "passed": ok},
            "seconds": {"widen": round(t_widen, 1), "check": round(t_check, 1)},
        }
        if not ok:
            print("the widened model does not reproduce the trained model's outputs: not installed", file=sys.stderr)
            return 1
        os.replace(tmp, a.output)
        report["seconds"]["total"] = round(time.perf_counter() - t0, 1)
        a.output.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {a.output} and {a.output.with_suffix('.json')} in {report['seconds']['total']:.0f} s")
        return 0
    except SmoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code or 1
    finally:
        tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
