"""scripts/bench.py: its pure parts, and a smoke run of the whole bench on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

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
         "prefill_tps": 40.0, "ttft_seconds": 1.5, "bytes_per_token": 30e6, "hit_rate": 0.7,
         "stall_per_token": 0.1, "peak_rss_bytes": 6e8, "cpu_per_token": 0.2, "same_as_a": True, "bit_exact": True},
        {"model": "m", "row": "b", "system": "stock llama.cpp, mmap, memory cgroup", "budget": "25%",
         "error": "unavailable: no memory cgroup controller mounted"},
        {"model": "m", "row": "limit", "system": "physical limit", "budget": "25%", "decode_tps": 40.0,
         "bytes_per_token": 30e6},
    ]


def test_physical_limit_formula() -> None:
    # 1 GB active at 10 GB/s = 0.1 s; 0.5 GB missed at 1 GB/s = 0.5 s -> 1/0.6 tok/s one after the other
    assert bench.physical_limit_tps(1e9, 5e8, 10e9, 1e9, overlap=False) == pytest.approx(1 / 0.6)
    assert bench.physical_limit_tps(1e9, 5e8, 10e9, 1e9) == pytest.approx(1 / 0.5)  # overlapped: the slower
    assert bench.physical_limit_tps(2e9, 0, 10e9, 1e9) == pytest.approx(5.0)


def test_same_tokens_compares_the_common_prefix() -> None:
    assert bench.same_tokens([[1, 2, 3], [4, 5]], [[1, 2], [4, 5, 6]]) == (True, 4)
    assert bench.same_tokens([[1, 2, 3]], [[1, 9, 3]]) == (False, 0)
    assert bench.same_tokens([[1]], [[1], [2]]) == (False, 0)


def test_table_markdown_and_report(tmp_path: Path) -> None:
    rows = _fake_rows()
    cells = bench.table_rows(rows)
    assert len(cells) == 4 and all(len(c) == len(bench.COLUMNS) for c in cells)
    assert cells[1][4] == "5.00" and cells[1][8] == "30.00" and cells[1][9] == "70.0%"
    assert cells[2][4].startswith("unavailable:")  # the reason takes the row's first figure cell
    assert cells[0][13] == bench.ENERGY_NONE
    md = bench.markdown_table(rows)
    assert md.count("\n") == 5 and "| m | b |" in md and "unavailable" in md
    result = {"command": "bench.py m.gguf", "machine": {"cpu": "x", "cores": 2, "memory_gib": 24.0, "os": "Linux",
              "llama_cpp": "0.3.36", "gpu_offload": False, "mem_bw": 1e10, "disk_bw": 1e9},
              "cache_drop": "files", "energy_source": bench.ENERGY_NONE, "prompts": ["p"], "n": 4,
              "notes": ["a note"], "rows": rows, "plot": None}
    bench.write_report(tmp_path, result)
    report = (tmp_path / "report.md").read_text()
    assert "bench.py m.gguf" in report and "a note" in report and "| m | c |" in report
    json.dumps(result)  # what results.json holds is JSON


def test_cgroup_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.sys, "platform", "darwin")
    d, why = bench.make_cgroup(1 << 30, "smoe-bench-test")
    assert d is None and why.startswith("unavailable: macOS")
    monkeypatch.setattr(bench.sys, "platform", "linux")
    monkeypatch.setattr(bench, "Path", _NoCgroupPath)
    d, why = bench.make_cgroup(1 << 30, "smoe-bench-test")
    assert d is None and why.startswith("unavailable:")


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
    bench.main([str(gguf), "--budgets", "25%,100%", "-n", "4", "--prompts", "1", "--drop", "files",
                "--learn-prompts", "1", "--learn-tokens", "2", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert (out / "report.md").is_file()
    a = [r for r in rows if r["row"] == "a"]
    assert len(a) == 1 and not a[0].get("error") and len(a[0]["tokens"]) == 1 and len(a[0]["tokens"][0]) == 4
    smoe = [r for r in rows if r["system"].startswith("smoe-gguf")]
    assert {(r["system"], r["budget"]) for r in smoe} == {
        (s, b) for s in ("smoe-gguf reactive LRU", "smoe-gguf orchestrator") for b in ("25%", "100%")}
    for r in smoe:
        assert not r.get("error"), r
        assert r["tokens"] == a[0]["tokens"] and r["same_as_a"] and r["bit_exact"]
        assert r["decode_tps"] > 0 and r["peak_rss_bytes"] > 0 and r["cpu_per_token"] > 0
        assert 0 <= r["hit_rate"] <= 1 and r["bytes_per_token"] is not None
    b = [r for r in rows if r["row"] == "b"]
    assert len(b) == 2 and all(r.get("error", "").startswith("unavailable") or r["same_as_a"] for r in b)
    assert [r["budget"] for r in rows if r["row"] == "limit"] == [None, "25%", "100%"]
    assert not [n for n in res["notes"] if "profile" in n], res["notes"]  # the orchestrator had its tree-map


def test_a_pack_split_from_another_file_is_refused(tiny_model: Callable[[str, str], Path], tmp_path: Path) -> None:
    split(tiny_model("qwen3moe", "f16"), tmp_path / "x.pack")
    bench.check_pack_source(tmp_path / "x.pack", tiny_model("qwen3moe", "f16"))  # the same file: fine
    with pytest.raises(SystemExit, match="split it again"):
        bench.check_pack_source(tmp_path / "x.pack", tiny_model("qwen3moe", "q8_0"))
