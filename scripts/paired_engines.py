"""Engine configurations compared in pairs: all of them open in one process, the prompts alternated
between them, the order reversed at each prompt.

    python scripts/paired_engines.py models/reference-large-qwen3moe.pack --budget 50% \\
        --configs orchestrator,orchestrator-py,reactive -n 64 --reps 2

On a shared machine whose speed moves within minutes, separate runs of two configurations
disagree by more than the effects being measured; alternating prompts between engines that are
all open at once puts each configuration's tokens in the same minutes. Decode is sampled at a
fixed seed (the bench's prompts and sampler). Each configuration generates the same tokens
(checked: paging never changes them). Prints, per configuration: decode tok/s over all its
tokens, bytes read per token (prompts included), hits over the whole session, stall per decoded
token, observer pauses; then the first configuration's decode against each other's. ``--json-out``
writes the same figures.

Configurations: ``reactive`` (LRU, no speculation, no profile), ``orchestrator`` (the defaults:
decoded tokens' speculation in C, the observer switch deciding), ``orchestrator-py`` (speculation
of decoded tokens observed in Python: ``Engine(speculate_native=False)``). Suffixes: ``+on`` holds the observer switch
on (``orchestrator+on``); ``+python-flights`` sends a gate whose miss a prefetch has in flight to
Python instead of the native pager (``orchestrator+python-flights``). ``--profile`` gives the
orchestrators a tree-map profile (not updated).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from smoe_gguf.devtools.prompts import DOMAIN_PROMPTS
from smoe_gguf.engine import Engine

SAMPLING = {"temp": 0.8, "seed": 0}
CONFIGS: dict[str, dict[str, Any]] = {
    "reactive": {"speculate": False, "policy": "lru", "profile": None},
    "orchestrator": {},
    "orchestrator-py": {"speculate_native": False},
}


SUFFIXES = ("on", "python-flights")


def engine_options(name: str, profile: Path | None) -> tuple[dict[str, Any], set[str]]:
    """Engine keyword arguments for configuration ``name``, and its suffixes (SUFFIXES)."""
    base, *suffixes = name.split("+")
    if base not in CONFIGS or not set(suffixes) <= set(SUFFIXES):
        raise SystemExit(f"unknown configuration {name!r}: one of {', '.join(CONFIGS)}, "
                         f"optionally with {' or '.join('+' + x for x in SUFFIXES)}")
    kw = {"profile": profile, **CONFIGS[base]}
    return kw, set(suffixes)


def compare(model: Path, budget: str, configs: list[str], n: int, reps: int, n_prompt: int = 128,
            profile: Path | None = None, prompts: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Run ``configs`` side by side (see the module's docstring); per configuration, its figures."""
    prompts = prompts or DOMAIN_PROMPTS
    engines: dict[str, Engine] = {}
    acc: dict[str, dict[str, Any]] = {}
    try:
        for name in configs:
            kw, suffixes = engine_options(name, profile)
            eng = engines[name] = Engine(model, budget=budget, n_ctx=max(256, n_prompt + n + 16), learn=False, **kw)
            if "on" in suffixes:
                eng.observer_switch.keep(True)
            if "python-flights" in suffixes and eng.residency.native is not None:
                eng.residency.native.serve_flights = False
            acc[name] = {"tokens": 0, "seconds": 0.0, "bytes": 0, "generated": []}
        turn = 0
        for _rep in range(reps):
            for text in prompts.values():
                for name in configs if turn % 2 == 0 else configs[::-1]:
                    eng, a = engines[name], acc[name]
                    eng.reset()
                    before = eng.stats().bytes_read
                    gen = eng.generate(eng.tokenize(text)[:n_prompt], n, **SAMPLING)
                    a["tokens"] += gen.stats.generated_tokens
                    a["seconds"] += gen.stats.generated_tokens / max(gen.stats.decode_tps, 1e-9)
                    a["bytes"] += eng.stats().bytes_read - before
                    a["generated"].append(gen.tokens)
                turn += 1
        out: dict[str, dict[str, Any]] = {}
        for name, a in acc.items():
            eng = engines[name]
            st = eng.stats()
            tokens = max(1, a["tokens"])
            out[name] = {
                "decode_tps": round(a["tokens"] / a["seconds"], 2) if a["seconds"] else 0.0,
                "mb_read_per_token": round(a["bytes"] / tokens / 1e6, 2),
                "hit_rate": round(st.hit_rate, 4),
                "stall_ms_per_decoded_token": round(1e3 * sum(eng.residency.stats.token_stalls) / tokens, 2),
                "observer_pauses": st.observer_pauses,
                "generated": a["generated"],
            }
        return out
    finally:
        for eng in engines.values():
            eng.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="a pack or a MoE GGUF")
    ap.add_argument("--budget", default="25%", help="expert budget of every configuration (default 25%%)")
    ap.add_argument("--configs", default="orchestrator,reactive",
                    help="comma-separated configurations; the first is compared with each other (default: orchestrator,reactive)")
    ap.add_argument("-n", type=int, default=64, help="tokens decoded per prompt (default 64)")
    ap.add_argument("--reps", type=int, default=1, help="passes over the prompts (default 1)")
    ap.add_argument("--profile", type=Path, default=None, help="tree-map profile for the orchestrators (read only)")
    ap.add_argument("--json-out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    if len(configs) < 2 or len(set(configs)) != len(configs):
        ap.error("--configs needs at least two different configurations")
    out = compare(args.model, args.budget, configs, args.n, args.reps, profile=args.profile)
    for name, r in out.items():
        print(f"{name:>18} {args.budget}: {r['decode_tps']:7.2f} tok/s  {r['mb_read_per_token']:7.2f} MB/token  "
              f"hits {r['hit_rate']:.3f}  stall {r['stall_ms_per_decoded_token']:6.1f} ms/token  "
              f"pauses {r['observer_pauses']}")
    first = configs[0]
    for name in configs[1:]:
        other = out[name]["decode_tps"]
        ratio = out[first]["decode_tps"] / other if other else float("nan")
        print(f"{first} against {name}: {ratio:.3f}x")
    same = all(r["generated"] == out[first]["generated"] for r in out.values())
    if not same:
        print("the configurations generated different tokens: paging changed the output", file=sys.stderr)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(out, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
