"""The `smoe-gguf` command line."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from .errors import SmoeError

app = typer.Typer(
    name="smoe-gguf",
    help="Run Mixture-of-Experts GGUF models bigger than fast memory, bit-exact, by paging their experts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


@contextmanager
def progress_bar(label: str, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A rich byte-progress bar; yields the (done, total) callback the pack functions take."""
    if not enabled:
        yield lambda done, total: None
        return
    with Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="A GGUF file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Show a GGUF's MoE layout: core, leaves, parts, and the smallest budget that runs it."""
    from .gguf_layout import read_layout
    from .moe import analyze

    m = analyze(read_layout(model))
    info: dict[str, Any] = {
        "file": str(model),
        "file_bytes": m.layout.file_size,
        "architecture": m.arch,
        "moe": m.is_moe,
        "layers": m.n_layer,
        "tensors": len(m.layout.tensors),
        "dense_core_bytes": m.core_bytes,
    }
    if m.is_moe:
        first = m.expert_tensors[m.moe_layers[0]]
        info |= {
            "moe_layers": len(m.moe_layers),
            "experts_per_layer": m.n_expert,
            "experts_used_per_token": m.n_expert_used,
            "shared_experts": m.n_expert_shared,
            "shared_expert_bytes": m.shared_expert_bytes,
            "leaves": m.n_leaves,
            "leaf_bytes": m.max_leaf_bytes,
            "part_bytes": {t.part: t.slice_bytes for t in first},
            "part_types": {t.part: t.info.type_name for t in first},
            "total_expert_bytes": m.expert_bytes,
            "active_expert_bytes_per_token": m.active_expert_bytes_per_token,
            "min_budget_bytes": m.min_budget,
        }
    if as_json:
        out.print_json(json.dumps(info))
        return
    table = Table(title=f"{model.name}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("architecture", m.arch)
    table.add_row("kind", "MoE" if m.is_moe else "dense (no routed experts: nothing to page)")
    table.add_row("layers", str(m.n_layer))
    table.add_row("file", human(m.layout.file_size))
    table.add_row("dense core", human(m.core_bytes))
    if m.is_moe:
        table.add_row("experts per layer", f"{m.n_expert} in {len(m.moe_layers)} MoE layers ({m.n_leaves} leaves)")
        table.add_row("experts used per token", str(m.n_expert_used))
        table.add_row("shared experts", f"{m.n_expert_shared} ({human(m.shared_expert_bytes)}, in the core)")
        table.add_row("bytes per leaf", human(m.max_leaf_bytes))
        for part, nbytes in info["part_bytes"].items():
            table.add_row(f"  part {part}", f"{human(nbytes)} ({info['part_types'][part]})")
        table.add_row("total expert bytes", human(m.expert_bytes))
        table.add_row("active expert bytes / token", human(m.active_expert_bytes_per_token))
        table.add_row("smallest budget (one token)", human(m.min_budget))
    out.print(table)


@app.command()
def split(
    model: Annotated[Path, typer.Argument(help="The MoE GGUF to split.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The pack directory to write.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Rewrite a MoE GGUF into a pack: dense core + one shard per leaf + manifest."""
    from .pack.split import split as do_split

    t0 = time.perf_counter()
    with progress_bar("split", not quiet) as tick:
        m = do_split(model, output, force=force, progress=tick)
    dt = time.perf_counter() - t0
    if not quiet:
        out.print(
            f"[green]wrote[/] {output}: core {human(m.core.size)}, {len(m.leaves)} leaves "
            f"({human(m.expert_bytes)}) in {dt:.1f} s ({m.source.size / 2**20 / max(dt, 1e-9):.0f} MiB/s)"
        )


@app.command()
def verify(
    pack: Annotated[Path, typer.Argument(help="A pack directory written by `split`.")],
    quick: Annotated[bool, typer.Option("--quick", help="Check file sizes only, not checksums.")] = False,
) -> None:
    """Check every file and leaf part of a pack against its manifest; non-zero exit on any fault."""
    from .pack.verify import verify as do_verify

    with progress_bar("verify", sys.stderr.isatty()) as tick:
        faults = do_verify(pack, quick=quick, progress=tick)
    for f in faults:
        err.print(f"[red]fault[/] {f}", highlight=False, soft_wrap=True)
    if faults:
        raise SmoeError(f"{pack}: {len(faults)} fault(s)")
    out.print(f"[green]ok[/] {pack}" + (" (sizes only)" if quick else ""))


@app.command()
def merge(
    pack: Annotated[Path, typer.Argument(help="A pack directory written by `split`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The GGUF file to write.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
) -> None:
    """Rebuild the source GGUF from a pack, byte-identical (its sha256 is checked)."""
    from .pack.merge import merge as do_merge

    with progress_bar("merge") as tick:
        do_merge(pack, output, force=force, progress=tick)
    out.print(f"[green]wrote[/] {output} (sha256 matches the source)")


@app.command()
def run(
    model: Annotated[Path, typer.Argument(help="A pack directory (from `split`) or a plain MoE GGUF.")],
    prompt: Annotated[str, typer.Option("-p", "--prompt", help="The prompt.")],
    n_tokens: Annotated[int, typer.Option("-n", "--n-tokens", help="Tokens to generate.")] = 64,
    budget: Annotated[
        str | None,
        typer.Option(help="X-Slot bytes for experts: 512MiB, 4G, or 25% of all expert bytes. "
                     "Default: what fits in available memory minus 1 GiB."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed (with --temp > 0).")] = 0,
    temp: Annotated[float, typer.Option(help="Temperature; 0 = greedy.")] = 0.0,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: cores, at most 8).")] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Context length in tokens.")] = 2048,
    checksums: Annotated[str, typer.Option(help="Check leaf sha256 on: first (read), always, never.")] = "first",
    stats: Annotated[bool, typer.Option("--stats", help="Print speed, paging and memory figures.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: text, tokens, figures.")] = False,
) -> None:
    """Generate text with the experts paged through a byte-budgeted X-Slot, bit-exact."""
    from .engine import Engine

    if n_tokens < 1:
        raise SmoeError("--n-tokens must be at least 1", exit_code=2)
    with Engine(model, budget=budget, n_ctx=ctx, n_threads=threads, checksums=checksums) as eng:
        if budget is None and not as_json:
            err.print(f"budget: {human(eng.budget)} (available memory minus 1 GiB; set --budget to change)")

        def stream(tok: int, piece: bytes) -> None:
            if not as_json:
                sys.stdout.write(piece.decode("utf-8", errors="replace"))
                sys.stdout.flush()

        gen = eng.generate(prompt, n_tokens, temp=temp, seed=seed, on_token=stream, stop_at_eog=True)
        figures: dict[str, Any] = {
            "prompt_tokens": gen.stats.prompt_tokens,
            "generated_tokens": gen.stats.generated_tokens,
            "prefill_tps": round(gen.stats.prefill_tps, 2),
            "decode_tps": round(gen.stats.decode_tps, 2),
            "ttft_seconds": round(gen.stats.ttft_seconds, 4),
            **eng.stats(),
        }
        if as_json:
            out.print_json(json.dumps({"text": gen.text, "tokens": gen.tokens, **figures}))
            return
        sys.stdout.write("\n")
        if stats:
            table = Table(title="smoe-gguf run", show_header=False)
            table.add_column(style="bold")
            table.add_column(justify="right")
            rows = [
                ("prefill", f"{figures['prefill_tps']:.1f} tok/s ({figures['prompt_tokens']} tokens, micro-batch {figures['n_ubatch']})"),
                ("decode", f"{figures['decode_tps']:.1f} tok/s ({figures['generated_tokens']} tokens)"),
                ("time to first token", f"{figures['ttft_seconds']:.3f} s"),
                ("start-up", f"{figures['startup_seconds']:.2f} s, {human(figures['startup_read_bytes'])} read (core {human(figures['core_bytes'])})"),
                ("leaves loaded", str(figures["leaves_loaded"])),
                ("hit rate", f"{figures['hit_rate'] * 100:.1f}% ({figures['hits']} hits, {figures['misses']} misses)"),
                ("bytes read from shards", human(figures["bytes_read"]) + (" (O_DIRECT)" if figures["direct_io"] else "")),
                ("stalled on leaves", f"{figures['stall_seconds']:.3f} s (checksums {figures['checksum_seconds']:.3f} s)"),
                ("peak resident experts", f"{human(figures['peak_resident_bytes'])} of {human(figures['budget_bytes'])} budget"),
                ("process peak RSS", human(figures["peak_rss_bytes"])),
            ]
            for k, v in rows:
                table.add_row(k, v)
            out.print(table)


@app.command("make-test-model")
def make_test_model(
    output: Annotated[Path, typer.Option("-o", "--output", help="The GGUF file to write.")],
    arch: Annotated[str, typer.Option(help="qwen3moe, qwen2moe, mixtral, ...")] = "qwen3moe",
    preset: Annotated[str, typer.Option(help="tiny (tests) or medium (benchmarks, > 1 GiB of experts).")] = "tiny",
    dtype: Annotated[str, typer.Option(help="f32, f16, q8_0 or q4_k.")] = "f16",
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = 0,
) -> None:
    """Build a seeded random MoE GGUF in a real llama.cpp architecture (no download)."""
    from . import testmodels

    for name, value, choices in (
        ("arch", arch, testmodels.ARCHS),
        ("preset", preset, testmodels.PRESETS),
        ("dtype", dtype, testmodels.DTYPES),
    ):
        if value not in choices:
            raise SmoeError(f"unknown {name} {value!r}: choose one of {', '.join(choices)}", exit_code=2)
    with progress_bar(f"build {arch}/{preset}/{dtype}") as tick:
        path = testmodels.build_test_model(output, arch, preset=preset, dtype=dtype, seed=seed, progress=tick)
    out.print(f"[green]wrote[/] {path} ({human(path.stat().st_size)})")


def main() -> None:
    try:
        app()
    except SmoeError as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
