"""scripts/bench.py: its pure parts, and a smoke run of the whole bench on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from smoe_gguf.devtools.diskprobe import device_counters
from smoe_gguf.pack.split import split

ROOT = Path(__file__).resolve().parents[1]


def _load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("smoe_bench_script", ROOT / "scripts" / "bench.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()


def _fake_rows() -> list[dict[str, Any]]:
    return [
        {"model": "m", "row": "a", "system": "stock llama.cpp, fully resident", "budget": None,
         "decode_tps": 60.0, "prefill_tps": 300.0, "ttft_seconds": 0.1, "bytes_per_token": 0.0,
         "peak_rss_bytes": 2e9, "cpu_per_token": 0.03, "same_as_a": True, "bit_exact": True},
        {"model": "m", "row": "c", "system": "smoe-gguf reactive LRU", "budget": "25%", "decode_tps": 5.0,
         "prefill_tps": 40.0, "ttft_seconds": 1.5, "bytes_per_token": 30e6, "hit_rate": 0.7, "belady_hit_rate": 0.85,
         "pct_of_limit_own": 0.125, "pct_of_limit_belady": 0.0625,
         "stall_per_token": 0.1, "peak_rss_bytes": 6e8, "cpu_per_token": 0.2, "same_as_a": True, "bit_exact": True,
         "disk_busy_seconds": 3.0, "disk_device_bytes": 4.5e9, "disk_window_seconds": 4.0},
        {"model": "m", "row": "b", "system": "stock llama.cpp, mmap, memory cgroup", "budget": "25%",
         "error": "unavailable: no memory cgroup controller mounted"},
        {"model": "m", "row": "limit", "system": bench.LIMIT_OWN, "budget": "25%", "decode_tps": 40.0,
         "bytes_per_token": 30e6},
        {"model": "m", "row": "limit", "system": bench.LIMIT_BELADY, "budget": "25%", "decode_tps": 80.0,
         "bytes_per_token": 15e6, "hit_rate": 0.85},
    ]


def test_physical_limit_formula() -> None:
    # 1 GB active at 10 GB/s = 0.1 s; 0.5 GB missed at 1 GB/s = 0.5 s -> 1/0.6 tok/s one after the other
    assert bench.physical_limit_tps(1e9, 5e8, 10e9, 1e9, overlap=False) == pytest.approx(1 / 0.6)
    assert bench.physical_limit_tps(1e9, 5e8, 10e9, 1e9) == pytest.approx(1 / 0.5)  # overlapped: the slower
    assert bench.physical_limit_tps(2e9, 0, 10e9, 1e9) == pytest.approx(5.0)
    assert bench.compute_limit_tps(0.01, 5e7, 1e9) == pytest.approx(20.0)  # the disk: 50 ms a token
    assert bench.compute_limit_tps(0.01, 0, 1e9) == pytest.approx(100.0)  # compute alone


def test_the_disk_bound_is_at_least_what_a_run_read() -> None:
    pooled = {"direct_io": True, "decode_tps": 30.0, "bytes_per_token": 5e7,
              "repeats": [{"decode_tps": 20.0, "bytes_per_token": 5e7}, {"decode_tps": 40.0, "bytes_per_token": 5e7}]}
    single = {"direct_io": True, "decode_tps": 10.0, "bytes_per_token": 1e8}
    buffered = {"direct_io": False, "decode_tps": 100.0, "bytes_per_token": 1e9}  # perhaps the page cache's
    assert bench.rows_read_rate([pooled, single, buffered]) == pytest.approx(2e9)  # the fastest run, not the pool
    assert bench.rows_read_rate([single, {"error": "boom", "direct_io": True}]) == pytest.approx(1e9)
    assert bench.rows_read_rate([buffered, {"direct_io": True, "decode_tps": 50.0, "bytes_per_token": 0}]) == 0.0
    # the device read 3 GB in the 1 s it was busy: faster than the run's 2 GB/s averaged over its decode
    busy = {**pooled, "repeats": [{**pooled["repeats"][1], "disk_busy_seconds": 1.0, "disk_device_bytes": 3e9,
                                   "disk_window_seconds": 2.0}]}
    assert bench.rows_read_rate([busy, single]) == pytest.approx(3e9)
    assert bench.rows_read_rate([{**busy, "direct_io": False}]) == 0.0  # the page cache's reads bound nothing
    # a full budget's run: 154 MB in 12 ms of busy time (the counter's grain), not a disk speed
    blip = {**pooled, "repeats": [{**pooled["repeats"][1], "disk_busy_seconds": 0.012, "disk_device_bytes": 1.54e8,
                                   "disk_window_seconds": 2.5}]}
    assert bench.rows_read_rate([blip]) == pytest.approx(2e9)
    curve = {"direct": True, "bytes_per_level": 1 << 28, "bytes_per_second": {1: 1e9}, "span_bytes": (4096, 4096), "best": 1.2e9,
             "best_readers": 1, "io_depth": 2}
    assert "limit uses 1.20 (the fastest sweep" in bench.disk_curve_text(curve)
    assert "limit uses 2.00 (a smoe-gguf run's decode; the fastest sweep 1.20" in bench.disk_curve_text(
        {**curve, "rows_best": 2e9})
    assert "limit uses 1 (the read cap; the fastest sweep 1.20" in bench.disk_curve_text(
        {**curve, "rows_best": 2e9, "capped": 1e9})


def test_same_tokens_compares_the_common_prefix() -> None:
    assert bench.same_tokens([[1, 2, 3], [4, 5]], [[1, 2], [4, 5, 6]]) == (True, 4)
    assert bench.same_tokens([[1, 2, 3]], [[1, 9, 3]]) == (False, 0)
    assert bench.same_tokens([[1]], [[1], [2]]) == (False, 0)


def test_table_markdown_and_report(tmp_path: Path) -> None:
    rows = _fake_rows()
    cells = bench.table_rows(rows)
    col = {c: i for i, (c, _) in enumerate(bench.COLUMNS)}
    assert len(cells) == 5 and all(len(c) == len(bench.COLUMNS) for c in cells)
    smoe = cells[1]
    assert smoe[col["decode tok/s"]] == "5.00" and smoe[col["MB read/token"]] == "30.00"
    assert smoe[col["hit rate"]] == "70.0%" and smoe[col["Belady hit"]] == "85.0%"
    assert smoe[col["% of limit: own / Belady"]] == "12.5% / 6.2%"
    assert smoe[col["disk busy in decode (GB/s busy)"]] == "75.0% (1.50)"  # 3 of 4 s busy, 4.5 GB in those 3 s
    assert cells[0][col["disk busy in decode (GB/s busy)"]] == "-"  # no device counters
    assert bench.disk_busy({"disk_busy_seconds": 0.0, "disk_device_bytes": 0, "disk_window_seconds": 1.0}) is None
    assert cells[2][4].startswith("unavailable:")  # the reason takes the row's first figure cell
    assert cells[0][col["J/token"]] == bench.ENERGY_NONE and cells[0][col["Belady hit"]] == "-"
    md = bench.markdown_table(rows)
    assert md.count("\n") == 6 and "| m | b |" in md and "unavailable" in md
    curve = {"bytes_per_second": {"1": 0.8e9, "4": 1.4e9}, "span_bytes": [1 << 20, 1 << 20],
             "bytes_per_level": 256 << 20, "direct": True, "best": 1.4e9, "best_readers": 4,
             "pager_readers": 4, "io_depth": 2}
    result = {"command": "bench.py m.gguf", "machine": {"cpu": "x", "cores": 2, "memory_gib": 24.0, "os": "Linux",
              "llama_cpp": "0.3.36", "gpu_offload": False, "mem_bw": 1e10, "disk": {"m": curve}},
              "cache_drop": "files", "energy_source": bench.ENERGY_NONE, "prompts": ["p"], "prompt_domains": ["python"],
              "n": 4, "sampling": {"temp": 0.8, "top_p": 0.95, "seed": 0}, "notes": ["a note"], "rows": rows,
              "plot": None}
    bench.write_report(tmp_path, result)
    report = (tmp_path / "report.md").read_text()
    assert "Command: `bench.py m.gguf`" in report and "- a note" in report
    assert "| m | c | smoe-gguf reactive LRU | 25% | 5.00 |" in report and "| 85.0% |" in report
    assert ("- m: O_DIRECT random reads of its 1024 KiB parts, 256 MiB per point, GB/s by concurrent readers "
            "1: 0.80, 4: 1.40; limit uses 1.40 (the fastest sweep, 4 readers); smoe-gguf rows read 2 at once (--io-depth; a leaf's parts are one read)") in report
    assert "1 x 4 tokens each, one per domain (python), sampled at temperature 0.8, top-p 0.95, seed 0" in report
    whole = {**curve, "bytes_per_second": {"1": 1.6e9, "4": 1.5e9}, "span_bytes": [3 << 20, 3 << 20]}
    both = {**curve, "leaves": whole, "best": 1.7e9, "best_readers": 1, "best_of": "leaves"}
    assert bench.disk_curve_text(both) == (
        "O_DIRECT random reads of its 1024 KiB parts, 256 MiB per point, GB/s by concurrent readers 1: 0.80, 4: 1.40; "
        "whole 3072 KiB leaves 1: 1.60, 4: 1.50; limit uses 1.70 (the fastest sweep of whole leaves, 1 readers); "
        "smoe-gguf rows read 2 at once (--io-depth; a leaf's parts are one read)")


def test_after_fill_compares_with_the_stock_run_beside_the_row() -> None:
    b = bench.Bench.__new__(bench.Bench)
    b.notes = []
    # prompt 1 decoded while the fill ran (not full when it started); prompts 2 and 3 started full
    row = {"system": "smoe-gguf orchestrator", "decode_each": [(2.0, 100), (1.0, 100), (1.0, 100)],
           "full_each": [False, True, True]}
    stock = {"decode_each": [(1.0, 100), (0.8, 100), (1.2, 100)]}
    b.after_fill("m", "100%", row, stock)
    assert row["whole_x_stock"] == pytest.approx((300 / 4.0) / (300 / 3.0))
    assert row["decode_after_fill_tps"] == pytest.approx(100.0) and row["after_fill_x_stock"] == pytest.approx(1.0)
    assert b.notes == ["m 100% smoe-gguf orchestrator: decode over the whole run 75.00 tok/s, 0.75x stock "
                       "resident's 100.00 run beside it; after the background fill (prompts 2, 3) 100.00 tok/s, "
                       "1.00x its 100.00 on the same prompts"]
    b.after_fill("m", "100%", {**row, "error": "boom"}, stock)  # a failed row: no note
    assert len(b.notes) == 1


def test_pool_runs_pools_decode_and_averages_the_rest() -> None:
    runs = [{"decode_each": [(1.0, 100), (1.0, 100)], "decode_tps": 100.0, "ttft_seconds": 1.0, "hit_rate": 0.5,
             "load_read_bytes": 10, "cpu_seconds": 2.0, "generated_tokens": 200, "tokens": [[1, 2], [3]],
             "replay_hit_rates": {"lru": 0.4}},
            {"decode_each": [(3.0, 100), (1.0, 100)], "decode_tps": 50.0, "ttft_seconds": 2.0, "hit_rate": 0.7,
             "load_read_bytes": 30, "cpu_seconds": 4.0, "generated_tokens": 200, "tokens": [[1, 2], [3]]}]
    row = bench.pool_runs(runs)
    assert row["decode_tps"] == pytest.approx(400 / 6.0) and row["decode_tokens"] == 400  # not the runs' mean (75)
    assert row["ttft_seconds"] == pytest.approx(1.5) and row["hit_rate"] == pytest.approx(0.6)
    assert row["load_read_bytes"] == 30 and row["cpu_per_token"] == pytest.approx(6.0 / 400)
    # the device's counters are summed over the runs, so the busy share is over all their decode time
    disk = [{"disk_busy_seconds": 1.0, "disk_device_bytes": 10, "disk_window_seconds": 2.0},
            {"disk_busy_seconds": 3.0, "disk_device_bytes": 30, "disk_window_seconds": 3.0}]
    assert bench.disk_busy(bench.pool_runs([{**r, **d} for r, d in zip(runs, disk)])) == (pytest.approx(0.8), 10.0)
    assert row["replay_hit_rates"] == {"lru": 0.4} and row["tokens"] == [[1, 2], [3]] and row["repeat_tokens_same"]
    assert [r["decode_tps"] for r in row["repeats"]] == [100.0, 50.0]
    assert bench.pool_runs(runs[:1]) == runs[0]
    assert bench.pool_runs([runs[0], {**runs[1], "tokens": [[1, 5], [3]]}])["repeat_tokens_same"] is False
    assert bench.pool_runs([runs[0], {"error": "boom"}]) == {"error": "boom"}  # a failed run fails the row


def test_decode_replay_counts_the_decode_phase() -> None:
    from smoe_gguf.trace import TraceData

    seq = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]  # MIN with 3 frames misses at 0-3, 5, 7, 10, 13, 17
    header = {"n_layer": 1, "n_expert": 8, "n_expert_used": 1, "leaf_cost": {"0": 1}, "total_cost": 8}
    data = TraceData(header, [(i, 1, 0, [[e]]) for i, e in enumerate(seq)], 0, 0)
    # a 5-token prompt (positions 0-4, here one token per micro-batch), then 15 decoded tokens
    got = bench.decode_replay(data, 3, "belady", [5], {0: 100}, 15)
    assert got == {"hit_rate": 10 / 15, "misses": 5, "bytes_per_token": 500 / 15, "hit_rate_all": 11 / 20}
    full = bench.decode_replay(data, 8, "belady", [5], {0: 100}, 15)  # room for every leaf
    assert full is not None and (full["hit_rate"], full["bytes_per_token"]) == (1.0, 0.0)


def test_long_c_prompt_takes_the_fewest_whole_lines(tmp_path: Path) -> None:
    from smoe_gguf.devtools.prompts import long_c_prompt

    (tmp_path / "stdio.h").write_text("".join(f"int f{i}(void);\n" for i in range(10)))
    (tmp_path / "stdlib.h").write_text("".join(f"long g{i}(void);\n" for i in range(10)))
    words = lambda t: len(t.split())  # noqa: E731 - a stand-in tokenizer: two "tokens" a line
    text = long_c_prompt(words, 25, tmp_path)
    assert words(text) == 26 and text.startswith("int f0(void);\n") and text.endswith("long g2(void);\n")
    assert long_c_prompt(words, 41, tmp_path) == ""  # the headers have 40


def test_decode_events_split_prompts_at_the_position_reset() -> None:
    # prompt 1: 5 tokens in one micro-batch (2 layers), 2 decoded tokens; prompt 2: 3 tokens, 1 decoded
    events = [(0, 5, 0, [[1]] * 5), (0, 5, 1, [[1]]), (5, 1, 0, [[2]]), (5, 1, 1, [[2]]), (6, 1, 0, [[3]]),
              (6, 1, 1, [[3]]), (0, 3, 0, [[1]] * 3), (0, 3, 1, [[1]]), (3, 1, 0, [[4]]), (3, 1, 1, [[4]])]
    assert bench.decode_events(events, [5, 3]) == [2, 3, 4, 5, 8, 9]
    assert bench.decode_events(events[:4], [5, 3]) == [2, 3]  # a trace that stops early
    assert bench.decode_events(events, [5]) is None  # more prompts in the trace than were run


def test_cgroup_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.sys, "platform", "darwin")
    d, why = bench.make_cgroup(1 << 30, "smoe-bench-test")
    assert d is None and why.startswith("unavailable: macOS")
    monkeypatch.setattr(bench.sys, "platform", "linux")
    monkeypatch.setattr(bench, "Path", _NoCgroupPath)
    d, why = bench.make_cgroup(1 << 30, "smoe-bench-test")
    assert d is None and why.startswith("unavailable:")


@pytest.mark.parametrize(("text", "rate"), [("1G", 10**9), ("500M", 5 * 10**8), ("1.5GB/s", 15 * 10**8),
                                             ("800000000", 8 * 10**8), ("64k", 64000)])
def test_parse_rate(text: str, rate: int) -> None:
    assert bench.parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "0", "-1G", "G"])
def test_parse_rate_refuses(text: str) -> None:
    with pytest.raises(bench.argparse.ArgumentTypeError, match="bad rate"):
        bench.parse_rate(text)


def test_disk_bound_is_the_fastest_seen_under_the_cap() -> None:
    assert bench.disk_bound(1.4e9, 2.3e9, None) == 2.3e9
    assert bench.disk_bound(2.6e9, 2.3e9, None) == 2.6e9
    assert bench.disk_bound(1.4e9, 2.3e9, 10**9) == 1e9
    assert bench.disk_bound(0.8e9, 0.5e9, 10**9) == 0.8e9


def test_read_cap_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(bench.sys, "platform", "darwin")
    assert bench.cap_reads(tmp_path, 10**9, "smoe-bench-test") == (None, None, "unavailable: no block-I/O cgroups "
                                                                               "on darwin")
    monkeypatch.setattr(bench.sys, "platform", "linux")
    monkeypatch.setattr(bench, "whole_disk", lambda path: None)
    d, home, why = bench.cap_reads(tmp_path, 10**9, "smoe-bench-test")
    assert d is None and why == f"unavailable: {tmp_path} is not on a block device"
    monkeypatch.setattr(bench, "whole_disk", lambda path: "254:0")
    monkeypatch.setattr(bench, "Path", _NoCgroupPath)
    d, home, why = bench.cap_reads(tmp_path, 10**9, "smoe-bench-test")
    assert d is None and why == "unavailable: no block-I/O cgroup controller mounted"


def test_read_cap_moves_this_process_and_back(tmp_path: Path) -> None:
    """Where this machine lets the test make a block-I/O cgroup: the process is in it, with the
    throttle set for its disk (a rate no disk reaches), and back where it was afterwards."""
    before = Path("/proc/self/cgroup").read_text() if sys.platform.startswith("linux") else ""
    d, home, why = bench.cap_reads(tmp_path, 10**13, "smoe-bench-test-cap")
    if d is None or home is None:
        pytest.skip(why)
    try:
        assert "smoe-bench-test-cap" in Path("/proc/self/cgroup").read_text()
        knob = d / ("io.max" if (d / "io.max").exists() else "blkio.throttle.read_bps_device")
        assert bench.whole_disk(tmp_path) in knob.read_text() and "10000000000000" in knob.read_text()
    finally:
        bench.uncap_reads(d, home)
    assert not d.exists()
    assert Path("/proc/self/cgroup").read_text() == before


class _NoCgroupPath(type(Path())):  # type: ignore[misc]
    """A Path under which no cgroup file system exists."""

    def read_text(self, *a: Any, **k: Any) -> str:
        if str(self) == "/proc/self/cgroup":
            return "0::/\n"
        return super().read_text(*a, **k)

    def is_dir(self) -> bool:
        return False if str(self).startswith("/sys/fs/cgroup") else super().is_dir()

    def is_file(self) -> bool:
        return False if str(self).startswith("/sys/fs/cgroup") else super().is_file()


def test_bench_smoke_on_tiny_model(tiny_model: Callable[[str, str], Path], tmp_path: Path) -> None:
    src = tiny_model("qwen3moe", "f16")
    gguf = tmp_path / "tiny.gguf"
    gguf.symlink_to(src)
    split(src, tmp_path / "tiny.pack")
    out = tmp_path / "out"
    bench.main([str(gguf), "--budgets", "25%,100%", "-n", "6", "--prompts", "2", "--drop", "files",
                "--learn-prompts", "1", "--learn-tokens", "2", "--disk-bytes", str(1 << 20), "--readers", "1,2",
                "--long-prompt", "200", "--repeats", "2", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert res["sampling"] == {"temp": 0.8, "top_p": 0.95, "seed": 0} and res["prompt_domains"] == ["python", "c"]
    curve = res["machine"]["disk"]["tiny"]
    whole = curve["leaves"]  # a pack: each leaf's parts follow one another in its shard, read whole too
    assert set(curve["bytes_per_second"]) == set(whole["bytes_per_second"]) == {"1", "2"}
    peaks = [*curve["peak_bytes_per_second"].values(), *whole["peak_bytes_per_second"].values()]
    assert curve["best"] == max(peaks) >= max(curve["bytes_per_second"].values()) > 0  # the limit: the fastest of both
    assert "whole" in (out / "report.md").read_text()
    a = [r for r in rows if r["row"] == "a"]
    assert len(a) == 1 and not a[0].get("error") and [len(t) for t in a[0]["tokens"]] == [6, 6]
    assert a[0]["weights"] == "in memory"  # stock resident at its best: --no-mmap
    assert a[0]["tokens"][0] != a[0]["tokens"][1]  # two prompts, two continuations
    smoe = [r for r in rows if r["system"].startswith("smoe-gguf")]
    assert {(r["system"], r["budget"]) for r in smoe} == {
        (s, b) for s in ("smoe-gguf reactive LRU", "smoe-gguf orchestrator") for b in ("25%", "100%")}
    for r in smoe:
        assert not r.get("error"), r
        # the same tokens as stock at the same micro-batch and threads; at 100% that is row (a)'s configuration
        assert r["bit_exact"] and r["tokens_compared"] == 12
        assert r["same_as_a"] if r["budget"] == "100%" else r["same_as_a"] is not None
        assert r["decode_tps"] > 0 and r["peak_rss_bytes"] > 0 and r["cpu_per_token"] > 0
        assert 0 <= r["hit_rate"] <= 1 and r["bytes_per_token"] is not None
        assert 0 <= r["belady_hit_rate"] <= 1 and r["pct_of_limit_own"] > 0 and r["pct_of_limit_belady"] > 0
        # the bound at stock's own compute is never above the roofline's
        assert r["limit_own_stock_tps"] <= r["limit_own_tps"] and r["pct_of_limit_own_stock"] >= r["pct_of_limit_own"]
        # the model's device counted over each decode where the kernel shows its counters
        counted = device_counters(tmp_path) is not None
        assert (r["disk_window_seconds"] is not None) == counted, r
        if counted:
            assert r["disk_window_seconds"] > 0 and r["disk_busy_seconds"] >= 0 and r["disk_device_bytes"] >= 0
    for r in smoe:  # two runs each (--repeats 2), pooled: both prompts' decodes of both runs
        assert len(r["repeats"]) == 2 and r["repeat_tokens_same"] and len(r["decode_each"]) == 4, r
        # the reactive trace was recorded in a run of its own (every gate through Python: slower), not pooled
        assert not any(x["traced"] for x in r["repeats"]), r["repeats"]
        assert (r.get("trace_run", {}).get("decode_tps", 0) > 0) == (r["system"] == "smoe-gguf reactive LRU"), r
        # the rows take turns going first: reactive, orchestrator; then orchestrator, reactive
        turns = [1, 4] if r["system"] == "smoe-gguf reactive LRU" else [2, 3]
        assert [x["turn"] for x in r["repeats"]] == turns, r["repeats"]
        # where stock runs beside the rows, one goes right before every run of both rows
        assert [x["after_stock"] for x in r["repeats"]] == [r["budget"] == "100%"] * 2, r["repeats"]
    assert len([n for n in res["notes"] if "orchestrator against reactive, pooled decode" in n]) == 2, res["notes"]
    for r in smoe:  # a budget that holds every leaf is compared with stock resident run beside its rows
        assert ("whole_x_stock" in r and r["decode_beside_stock_tps"] > 0) == (r["budget"] == "100%"), r
    assert len([n for n in res["notes"] if "stock resident's" in n and "run beside it" in n]) == 2, res["notes"]
    same_engine = [n for n in res["notes"] if "runs reactive's engine" in n]  # only where nothing is paged
    assert len(same_engine) == 1 and same_engine[0].startswith("tiny 100%: "), res["notes"]
    for r in smoe:
        if r["system"] == "smoe-gguf reactive LRU":
            rates = r["replay_hit_rates"]
            assert set(rates) == {"lru", "lfru", "least-stale", "belady"}
            assert rates["belady"] >= max(rates["lru"], rates["lfru"], rates["least-stale"])
    b = [r for r in rows if r["row"] == "b"]
    assert len(b) == 2 and all(r.get("error", "").startswith("unavailable") or r["same_as_a"] for r in b)
    assert all(r.get("error") or r["weights"] == "mmap" for r in b)
    assert [(r["budget"], r["system"]) for r in rows if r["row"] == "limit"] == [
        (None, bench.LIMIT_NONE), ("25%", bench.LIMIT_OWN), ("25%", bench.LIMIT_BELADY),
        ("100%", bench.LIMIT_OWN), ("100%", bench.LIMIT_BELADY)]
    limits = {(r["budget"], r["system"]): r for r in rows if r["row"] == "limit"}
    # fewer missed bytes, a higher limit: Belady's is at least smoe-gguf's
    assert limits[("25%", bench.LIMIT_BELADY)]["decode_tps"] >= limits[("25%", bench.LIMIT_OWN)]["decode_tps"] * 0.999
    assert not [n for n in res["notes"] if "profile" in n or "Belady figures" in n], res["notes"]
    long = res["long_prompt"]
    assert [r["budget"] for r in long] == ["25%", "100%"] and not any(r["error"] for r in long), long
    assert all(r["prompt_tokens"] >= 200 and r["ttft_seconds"] > 0 and r["stock_ttft_seconds"] > 0 for r in long)
    # at 25% the prompt streams leaves from disk; a budget that holds them all reads each at most once
    assert long[0]["expert_bytes_per_prompt_token"] > 0
    report = (out / "report.md").read_text()
    assert "| tiny | 25% |" in report and "expert MB read / prompt token" in report
    assert "Belady hit" in report and "- tiny: " in report and "by concurrent readers 1: " in report
    assert (out / "plot.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)


def test_a_pack_split_from_another_file_is_refused(tiny_model: Callable[[str, str], Path], tmp_path: Path) -> None:
    split(tiny_model("qwen3moe", "f16"), tmp_path / "x.pack")
    bench.check_pack_source(tmp_path / "x.pack", tiny_model("qwen3moe", "f16"))  # the same file: fine
    with pytest.raises(SystemExit, match="split it again"):
        bench.check_pack_source(tmp_path / "x.pack", tiny_model("qwen3moe", "q8_0"))


def test_training_text_follows_a_widened_model_to_its_source(tmp_path: Path) -> None:
    (tmp_path / "ref.json").write_text(json.dumps({"training": {"steps": 554, "stopped_by": "time", "seconds": 1023.9},
                                                   "train_config": {"steps": 1000}}))
    (tmp_path / "large.json").write_text(json.dumps({"source": "models/ref.gguf", "factor": 16}))
    assert bench.training_text(tmp_path / "ref.gguf") == "trained 554 of 1000 steps, stopped by a time cap after 1023.9 s"
    assert bench.training_text(tmp_path / "large.gguf") == (
        "widened from ref.gguf, trained 554 of 1000 steps, stopped by a time cap after 1023.9 s")
    assert bench.training_text(tmp_path / "other.gguf") is None  # no record: a model from elsewhere
