"""Build a seeded random MoE GGUF in a real llama.cpp architecture (no download): a tool for
tests, the demo and the bench.

    python scripts/make_test_model.py -o models/x.gguf [--arch A] [--preset tiny|medium] [--dtype D] [--seed S]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smoe_gguf.console import err, human, out, progress_bar
from smoe_gguf.devtools import testmodels
from smoe_gguf.errors import SmoeError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", type=Path, required=True, help="The GGUF file to write.")
    ap.add_argument("--arch", default="qwen3moe", choices=testmodels.ARCHS)
    ap.add_argument("--preset", default="tiny", choices=testmodels.PRESETS,
                    help="tiny (tests) or medium (benchmarks, > 1 GiB of experts).")
    ap.add_argument("--dtype", default="f16", choices=testmodels.DTYPES)
    ap.add_argument("--seed", type=int, default=0, help="Random seed: same seed, same bytes.")
    a = ap.parse_args(argv)
    try:
        with progress_bar(f"build {a.arch}/{a.preset}/{a.dtype}") as tick:
            path = testmodels.build_test_model(a.output, a.arch, preset=a.preset, dtype=a.dtype, seed=a.seed,
                                               progress=tick)
    except SmoeError as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return e.exit_code
    out.print(f"[green]wrote[/] {path} ({human(path.stat().st_size)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
