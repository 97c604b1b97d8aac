"""The `smoe-gguf` command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from .console import err, human, out, progress_bar
from .errors import SmoeError
from .readpool import DEFAULT_IO_DEPTH

app = typer.Typer(
    name="smoe-gguf",
    help="Run Mixture-of-Experts GGUF models bigger than fast memory, bit-exact, by paging their experts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help="On an error, also print its traceback (or set SMOE_DEBUG=1).")] = False,
) -> None:
    from . import exits

    exits.DEBUG = debug
ModelArg = Annotated[Path, typer.Argument(help="A pack directory (from `split`) or a plain MoE GGUF.")]
BudgetOpt = Annotated[str | None, typer.Option(help="X-Slot bytes for experts: 512MiB, 4G, or 25% of all expert "
                                               "bytes. Default: what fits in available memory minus 1 GiB.")]
THREADS_HELP = "CPU threads (default: cores, at most 8; decode uses one less while leaves are paged)."
ChecksumsOpt = Annotated[str, typer.Option(help="Check leaf sha256 on: first (read), always, never (unsafe: a "
                                             "damaged pack then gives wrong output silently).")]
# Options of every command that runs a model: how leaves are fetched and evicted.
PolicyOpt = Annotated[str, typer.Option(help="Eviction policy: lfru (frequency-weighted LRU), lru or "
                                        "least-stale (layer order).")]
NoSpeculateOpt = Annotated[bool, typer.Option("--no-speculate", help="Do not prefetch: no guessed experts (the "
                                              "next layers', a decoded token's first layer's), and no "
                                              "down parts read ahead for a prompt taken part by part.")]
ProfileOpt = Annotated[Path | None, typer.Option("--profile", help="The tree-map profile file (default: one per model "
                                                 "under ~/.cache/smoe-gguf/profiles).")]
NoProfileOpt = Annotated[bool, typer.Option("--no-profile", help="Neither read nor write a profile.")]
NoLearnOpt = Annotated[bool, typer.Option("--no-learn", help="Use the profile but do not add this session to it.")]
PinOpt = Annotated[int, typer.Option(help="Keep the profile's N most used leaves resident, outside the policy.")]
IoDepthOpt = Annotated[int, typer.Option("--io-depth", min=1, max=64, help="Leaf parts read from disk at once; "
                                         "prefetches hold at most depth x 512 KiB in flight (`make bench` "
                                         "prints the depth it reads with on this disk).")]
PipelineOpt = Annotated[bool, typer.Option("--pipeline", help="Part pipelining: a missed leaf's down parts are read "
                                           "while its gate/up matmuls run (off by default; see README).")]


def _warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def orchestrator_options(policy: str, no_speculate: bool, profile: Path | None, no_profile: bool,
                         no_learn: bool, pin: int, pipeline: bool = False,
                         io_depth: int = DEFAULT_IO_DEPTH) -> dict[str, Any]:
    """Engine keyword arguments from the options above."""
    if pin < 0:
        raise SmoeError("--pin must be 0 or more", exit_code=2)
    return {"policy": policy, "speculate": not no_speculate, "pipeline": pipeline,
            "profile": None if no_profile else (profile or "auto"), "learn": not no_learn, "pin": pin,
            "io_depth": io_depth}


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="A GGUF file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Show a GGUF's MoE layout: core, leaves, parts, and the smallest budget that runs it."""
    from . import archs
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
        largest = m.expert_tensors[max(m.moe_layers, key=m.leaf_bytes)]
        types: dict[str, list[str]] = {}  # part -> its types, in layer order (a quant mix varies them)
        for layer in m.moe_layers:
            for t in m.expert_tensors[layer]:
                if t.info.type_name not in types.setdefault(t.part, []):
                    types[t.part].append(t.info.type_name)
        info |= {
            "support": archs.support(m.arch),
            "moe_layers": len(m.moe_layers),
            "experts_per_layer": m.n_expert,
            "experts_used_per_token": m.n_expert_used,
            "shared_experts": m.n_expert_shared,
            "shared_expert_bytes": m.shared_expert_bytes,
            "leaves": m.n_leaves,
            "leaf_bytes": m.max_leaf_bytes,
            "part_bytes": {t.part: t.slice_bytes for t in largest},
            "part_types": {part: "/".join(names) for part, names in types.items()},
            "total_expert_bytes": m.expert_bytes,
            "active_expert_bytes_per_token": m.active_expert_bytes_per_token,
            "min_budget_bytes": m.min_budget,
            "layer_budget_bytes": m.layer_budget,
        }
    if as_json:
        out.print_json(json.dumps(info))
        return
    table = Table(title=f"{model.name}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("architecture", m.arch)
    table.add_row("kind", "MoE" if m.is_moe else "dense (no routed experts: nothing to page)")
    if m.is_moe:
        table.add_row("support", info["support"] + (" (split and run refuse it)"
                                                    if info["support"] == archs.UNSUPPORTED else ""))
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
        table.add_row("one layer of experts (prompts read each leaf once)", human(m.layer_budget))
    out.print(table)


@app.command()
def split(
    model: Annotated[Path, typer.Argument(help="The MoE GGUF to split.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="The pack directory to write "
                                                "(default: beside the model, MODEL.pack).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Rewrite a MoE GGUF into a pack: dense core + one shard per leaf + manifest."""
    from .pack.split import split as do_split

    if output is None:
        output = model.with_name((model.name[:-5] if model.name.endswith(".gguf") else model.name) + ".pack")
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
    output: Annotated[Path | None, typer.Option("-o", "--output", help="The GGUF file to write "
                                                "(default: beside the pack, PACK.merged.gguf).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
) -> None:
    """Rebuild the source GGUF from a pack, byte-identical (its sha256 is checked)."""
    from .pack.merge import merge as do_merge

    if output is None:
        stem = pack.name[:-5] if pack.name.endswith(".pack") else pack.name
        output = pack.with_name(stem + ".merged.gguf")
    with progress_bar("merge") as tick:
        do_merge(pack, output, force=force, progress=tick)
    out.print(f"[green]wrote[/] {output} (sha256 matches the source)")


@app.command()
def run(
    model: ModelArg,
    prompt: Annotated[str, typer.Option("-p", "--prompt", help="The prompt.")],
    n_tokens: Annotated[int, typer.Option("-n", "--n-tokens", help="Tokens to generate.")] = 64,
    budget: BudgetOpt = None,
    seed: Annotated[int, typer.Option(help="Sampling seed (with --temp > 0).")] = 0,
    temp: Annotated[float, typer.Option(help="Temperature; 0 = greedy.")] = 0.0,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP)] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Context length in tokens.")] = 2048,
    checksums: ChecksumsOpt = "first",
    stats: Annotated[bool, typer.Option("--stats", help="Print speed, paging and memory figures.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: text, tokens, figures.")] = False,
    policy: PolicyOpt = "lfru",
    no_speculate: NoSpeculateOpt = False,
    profile: ProfileOpt = None,
    no_profile: NoProfileOpt = False,
    no_learn: NoLearnOpt = False,
    pin: PinOpt = 0,
    pipeline: PipelineOpt = False,
    io_depth: IoDepthOpt = DEFAULT_IO_DEPTH,
    trace: Annotated[Path | None, typer.Option(help="Record every leaf access to this file (JSON lines), "
                                               "for `smoe-gguf replay`.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template, as "
                                       "`smoe-gguf chat` does (same micro-batches: same tokens).")] = False,
    system: Annotated[str | None, typer.Option(help="A system message (with --chat).")] = None,
    ubatch: Annotated[int | None, typer.Option(help="Prompt micro-batch in tokens (default: 512, or 2048 while "
                                               "paging with a budget that holds one layer of experts, so that a "
                                               "prompt reads each leaf once; smaller budgets shrink it).")] = None,
) -> None:
    """Generate text with the experts paged through a byte-budgeted X-Slot, bit-exact."""
    from . import spin

    spin.for_budget(model, budget)  # before llama.cpp loads
    from .engine import Engine
    from .options import check_n_tokens, check_run, prompt_text
    from .template import CHAT_UBATCH, ChatTemplate, ReplyText, conversation, printable

    check_n_tokens(n_tokens)
    if system is not None and not chat:
        raise SmoeError("--system needs --chat", exit_code=2)
    check_run(model, ctx=ctx, threads=threads, temp=temp, checksums=checksums, warn=_warn, trace=trace,
              profile=None if no_profile else profile)
    prompt, system = prompt_text(prompt), None if system is None else prompt_text(system)
    if ubatch is not None and ubatch < 1:
        raise SmoeError("--ubatch must be at least 1", exit_code=2)
    with Engine(model, budget=budget, n_ctx=ctx, n_threads=threads, checksums=checksums, trace=trace,
                n_ubatch=CHAT_UBATCH if chat else ubatch,
                **orchestrator_options(policy, no_speculate, profile, no_profile, no_learn, pin, pipeline,
                                     io_depth)) as eng:
        reply = None
        if chat:
            template = ChatTemplate.of(eng.model)
            prompt = template.render(conversation(system, prompt))
            reply = ReplyText(template.stop_text)  # the fallback format's replies end at "User:"
        for w in eng.warnings:
            err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
        if budget is None and not as_json:
            err.print(f"budget: {human(eng.budget)} (available memory minus 1 GiB; set --budget to change)")
        tokens = eng.tokenize(prompt)
        if (hint := eng.prompt_hint(len(tokens))) is not None:
            err.print(f"[yellow]hint:[/] {hint}", highlight=False, soft_wrap=True)

        def stream(tok: int, piece: bytes) -> None:
            if reply is not None and not eng.is_eog(tok):
                reply.add(piece)
            if not as_json:
                sys.stdout.write(printable(piece.decode("utf-8", errors="replace")))
                sys.stdout.flush()

        gen = eng.generate(tokens, n_tokens, temp=temp, seed=seed, on_token=stream, stop_at_eog=True,
                           should_stop=None if reply is None else lambda: reply.stopped)
        g, st = gen.stats, eng.stats()
        if as_json:
            out.print_json(json.dumps({
                "text": gen.text, "tokens": gen.tokens, "prompt_tokens": g.prompt_tokens,
                "generated_tokens": g.generated_tokens, "prefill_tps": round(g.prefill_tps, 2),
                "decode_tps": round(g.decode_tps, 2), "ttft_seconds": round(g.ttft_seconds, 4), **st.as_dict()}))
            return
        sys.stdout.write("\n")
        if stats:
            out.print(_stats_table(g, st))


def _stats_table(g: Any, st: Any) -> Table:
    """``run --stats``: a generation's and its engine's figures."""
    table = Table(title="smoe-gguf run", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    spec = st.speculation
    rows = [
        ("prefill", f"{g.prefill_tps:.1f} tok/s ({g.prompt_tokens} tokens, micro-batch {st.n_ubatch})"),
        ("decode", f"{g.decode_tps:.1f} tok/s ({g.generated_tokens} tokens)"),
        ("time to first token", f"{g.ttft_seconds:.3f} s"),
        ("start-up", f"{st.startup_seconds:.2f} s, {human(st.startup_read_bytes)} read (core {human(st.core_bytes)})"),
        ("leaves loaded", str(st.leaves_loaded)),
        ("hit rate", f"{st.hit_rate * 100:.1f}% ({st.hits} hits, {st.misses} misses)"),
        ("prefetched", f"{st.prefetched} leaves ({st.prefetch_late} arrived late, {st.prefetch_wasted} evicted unused)"),
        *([("speculation", ", ".join(
            f"{a} layer{'s' * (a != '1')} ahead: precision {la['precision'] * 100:.0f}%, recall {la['recall'] * 100:.0f}%"
            for a, la in spec["lookaheads"].items()) + f" (top {spec['rank']})")] if spec else []),
        ("stall saved by prefetch", f"{st.prefetch_stall_saved_seconds:.3f} s"),
        ("bytes read from shards", human(st.bytes_read) + (" (O_DIRECT)" if st.direct_io else "")),
        ("stalled on leaves", f"{st.stall_seconds:.3f} s (per decoded token: median "
                              f"{st.stall_per_token_p50 * 1e3:.1f} ms, p95 {st.stall_per_token_p95 * 1e3:.1f} ms; "
                              f"checksums {st.checksum_seconds:.3f} s)"),
        ("peak resident experts", f"{human(st.peak_resident_bytes)} of {human(st.budget_bytes)} budget"),
        ("process peak RSS", human(st.peak_rss_bytes)),
    ]
    for k, v in rows:
        table.add_row(k, v)
    return table


@app.command()
def replay(
    trace_file: Annotated[Path, typer.Argument(metavar="TRACE", help="A trace written by `run --trace`.")],
    policy: Annotated[str, typer.Option(help="Comma-separated policies: lru, lfru, least-stale, belady (the "
                                        "offline optimum), or all.")] = "all",
    budget: Annotated[str, typer.Option(help="Comma-separated budgets: bytes (512MiB) or % of all expert bytes.")] = "10%,25%,50%",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
) -> None:
    """Replay a recorded trace under eviction policies and budgets, without a model: hit rates."""
    from .budget import parse_budget
    from .replay import REPLAY_POLICIES
    from .replay import replay as do_replay
    from .trace import load

    data = load(trace_file)
    policies = list(REPLAY_POLICIES) if policy == "all" else [p.strip() for p in policy.split(",") if p.strip()]
    budgets = [(b.strip(), parse_budget(b, data.total_cost)) for b in budget.split(",") if b.strip()]
    if not policies or not budgets:
        raise SmoeError("--policy and --budget each need at least one value", exit_code=2)
    results = [(label, do_replay(data, b, p)) for label, b in budgets for p in policies]
    if as_json:
        out.print_json(json.dumps([
            {"policy": r.policy, "budget": label, "budget_bytes": r.budget, "hit_rate": round(r.hit_rate, 4),
             "hits": r.hits, "misses": r.misses, "evictions": r.evictions, "bytes_loaded": r.bytes_loaded,
             "by_layer": [{"layer": layer, "hits": h, "misses": m}
                          for layer, (h, m) in enumerate(zip(r.layer_hits, r.layer_misses)) if h + m]}
            for label, r in results]))
        return
    live = data.live_hits / max(1, data.live_accesses)
    table = Table(title=f"replay {trace_file.name}: {len(data.events)} gates, live hit rate {live * 100:.1f}%")
    for col in ("budget", "policy", "hit rate", "misses", "evictions", "bytes loaded"):
        table.add_column(col, justify="left" if col in ("budget", "policy") else "right")
    for label, r in results:
        table.add_row(f"{label} ({human(r.budget)})", r.policy, f"{r.hit_rate * 100:.1f}%", str(r.misses),
                      str(r.evictions), human(r.bytes_loaded))
    out.print(table)


@app.command()
def profile(
    model: Annotated[Path, typer.Argument(help="A pack directory or a plain MoE GGUF.")],
    prompts: Annotated[Path | None, typer.Option(help="A text file, one prompt per line: run each and "
                                                 "learn which leaves fire together.")] = None,
    show: Annotated[bool, typer.Option("--show", help="Print the tree-map (branches and their leaves).")] = False,
    n_tokens: Annotated[int, typer.Option("-n", "--n-tokens", help="Tokens to generate per prompt.")] = 32,
    budget: Annotated[str, typer.Option(help="X-Slot budget while learning (paging must be on to see routing).")] = "25%",
    profile_file: ProfileOpt = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
) -> None:
    """Learn (--prompts) and show (--show) the per-user tree-map of leaves that fire together."""
    from . import profile as tree_map
    from .engine import Engine
    from .options import check_n_tokens, check_outputs, check_threads, prompt_text
    from .safeio import read_file
    from .source import model_identity

    if prompts is None and not show:
        raise SmoeError("give --prompts FILE to learn, --show to print the tree-map, or both", exit_code=2)
    check_n_tokens(n_tokens)
    check_threads(threads)
    check_outputs(model, profile=profile_file)
    model_id, n_layer, n_expert = model_identity(model)
    path = profile_file or tree_map.default_path(model_id)
    if prompts is not None:
        text = prompt_text(read_file(prompts, limit=1 << 26).decode("utf-8", "surrogateescape"))
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise SmoeError(f"{prompts} holds no prompt")
        with Engine(model, budget=budget, n_threads=threads, profile=path) as eng:
            for w in eng.warnings:
                err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
            if eng.recorder is None:
                raise SmoeError("the budget holds every leaf: nothing is paged, nothing to learn; lower --budget")
            with Progress(TextColumn("[bold]learning"), BarColumn(), TextColumn("{task.completed}/{task.total} prompts"),
                          console=err, transient=True, disable=not sys.stderr.isatty()) as bar:
                task = bar.add_task("learn", total=len(lines))
                for line in lines:
                    eng.reset()
                    eng.generate(line, n_tokens)
                    bar.advance(task)
            prof = eng.save_profile()
        if prof is not None:
            out.print(f"[green]learnt[/] {len(lines)} prompts into {path} ({len(prof.windows)} windows, "
                      f"{prof.sessions} sessions)")
    if show:
        prof, _ = tree_map.load(path, model_id, n_layer, n_expert,
                                lambda m: err.print(f"[yellow]warning:[/] {m}", soft_wrap=True))
        if prof.tree is None:
            out.print(f"no profile yet at {path}: run `smoe-gguf profile {model} --prompts FILE`, or any run")
            return
        out.print(_render_tree(prof, path))


def _render_tree(prof: Any, path: Path) -> Any:
    from rich.tree import Tree

    def label(node: Any, name: str) -> str:
        leaves = ", ".join(f"L{l}·E{e} {s * 100:.0f}%" for l, e, s in node.leaves[:6])
        return f"[bold]{name}[/] weight {node.weight:.1f}: {leaves}"

    def add(tree: Any, node: Any, name: str) -> None:
        for i, child in enumerate(node.children):
            add(tree.add(label(child, f"{name}.{i}")), child, f"{name}.{i}")

    root = Tree(f"{label(prof.tree, 'tree-map')} ({prof.sessions} sessions, {len(prof.windows)} windows) — {path}")
    add(root, prof.tree, "branch")
    return root


@app.command()
def chat(
    model: ModelArg,
    budget: BudgetOpt = None,
    system: Annotated[str | None, typer.Option(help="A system message for the conversation.")] = None,
    policy: PolicyOpt = "lfru",
    n_tokens: Annotated[int, typer.Option("-n", "--n-tokens", help="Most tokens per reply.")] = 256,
    seed: Annotated[int, typer.Option(help="Sampling seed (with --temp > 0).")] = 0,
    temp: Annotated[float, typer.Option(help="Temperature; 0 = greedy.")] = 0.0,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP)] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Context length in tokens.")] = 2048,
    checksums: ChecksumsOpt = "first",
    io_depth: IoDepthOpt = DEFAULT_IO_DEPTH,
    typeahead: Annotated[bool, typer.Option("--typeahead/--no-typeahead",
                                            help="Prefill the prompt while it is typed.")] = True,
    debug_tokens: Annotated[bool, typer.Option("--debug-tokens", hidden=True,
                                               help="Print each reply's token ids (for tests).")] = False,
) -> None:
    """Chat with the model's own chat template; your prompt is prefilled while you type."""
    from . import spin

    spin.for_budget(model, budget)  # before llama.cpp loads
    from .chat import run_chat
    from .options import check_n_tokens, check_run

    check_n_tokens(n_tokens)
    check_run(model, ctx=ctx, threads=threads, temp=temp, checksums=checksums, warn=_warn)
    run_chat(model, budget, system, policy, n_tokens, temp, seed, threads, ctx, checksums, typeahead, debug_tokens,
             io_depth)


@app.command()
def serve(
    model: ModelArg,
    budget: BudgetOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port, printed).")] = 8080,
    api_key: Annotated[str | None, typer.Option(envvar="SMOE_API_KEY", help="Require 'Authorization: Bearer "
                                                "KEY' on every endpoint but /health (or set SMOE_API_KEY).")] = None,
    model_name: Annotated[str | None, typer.Option(help="The model id clients use (default: the "
                                                   "pack's or file's name).")] = None,
    queue: Annotated[int, typer.Option(help="Requests that may wait while one is answered; more get 503.")] = 16,
    max_tokens: Annotated[int, typer.Option(help="Reply tokens when a request does not set max_tokens.")] = 512,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes; larger ones get 413.")] = 8 << 20,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP)] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Context length in tokens (prompt and reply together).")] = 4096,
    checksums: ChecksumsOpt = "first",
    policy: PolicyOpt = "lfru",
    no_speculate: NoSpeculateOpt = False,
    profile: ProfileOpt = None,
    no_profile: NoProfileOpt = False,
    no_learn: NoLearnOpt = False,
    pin: PinOpt = 0,
    pipeline: PipelineOpt = False,
    io_depth: IoDepthOpt = DEFAULT_IO_DEPTH,
) -> None:
    """Serve the model over OpenAI's HTTP API (/v1/chat/completions, /v1/completions, /v1/models)."""
    from . import spin

    spin.for_budget(model, budget)  # before llama.cpp loads
    from .serve import serve as do_serve

    do_serve(model, host, port, api_key, queue, max_tokens, max_body, model_name,
             {"budget": budget, "n_ctx": ctx, "n_threads": threads, "checksums": checksums,
              **orchestrator_options(policy, no_speculate, profile, no_profile, no_learn, pin, pipeline, io_depth)})


def main() -> None:
    from .exits import run_app

    run_app(app)


if __name__ == "__main__":
    main()
