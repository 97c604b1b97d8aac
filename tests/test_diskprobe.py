"""The bench's disk probe (smoe_gguf/devtools/diskprobe.py): the spans it reads are the store's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from smoe_gguf.devtools.diskprobe import (
    DeviceCounters,
    ReadCurve,
    device_counters,
    leaf_read_bytes,
    leaf_spans,
    parse_block_stat,
    part_spans,
    random_read_curve,
)
from smoe_gguf.pack import manifest as mf
from smoe_gguf.store import BLOCK


def test_spans_are_the_aligned_parts_of_every_leaf(pack_of: Callable[[str, str], Path],
                                                   tiny_model: Callable[[str, str], Path]) -> None:
    pack = pack_of("qwen3moe", "f16")
    m = mf.load(pack)
    spans = part_spans(pack)
    assert len(spans) == sum(len(lf.parts) for lf in m.leaves)
    assert all(s.offset % BLOCK == 0 and s.length % BLOCK == 0 and s.length > 0 for s in spans)
    by_leaf = {(lf.layer, lf.expert): lf for lf in m.leaves}
    for s in spans:  # each span covers its part
        parts = by_leaf[(s.layer, s.expert)].parts
        assert any(s.offset <= p.offset and p.offset + p.length <= s.offset + s.length for p in parts)
    per_layer = leaf_read_bytes(spans)
    assert set(per_layer) == {lf.layer for lf in m.leaves}
    assert all(n >= max(lf.nbytes for lf in m.leaves if lf.layer == layer) for layer, n in per_layer.items())
    # a plain GGUF: the same parts, read by offset from the one file
    gspans = part_spans(tiny_model("qwen3moe", "f16"))
    assert len(gspans) == len(spans) and len({s.path for s in gspans}) == 1


def test_leaf_spans_are_whole_shards_of_a_pack_and_parts_of_a_gguf(pack_of: Callable[[str, str], Path],
                                                                   tiny_model: Callable[[str, str], Path]) -> None:
    pack = pack_of("qwen3moe", "f16")
    m = mf.load(pack)
    leaves = leaf_spans(part_spans(pack))
    assert len(leaves) == len(m.leaves)  # one read per leaf: its shard's parts follow one another
    for s in leaves:
        lf = next(lf for lf in m.leaves if (lf.layer, lf.expert) == (s.layer, s.expert))
        assert s.offset == 0 and lf.parts[-1].offset + lf.parts[-1].length <= s.length
    assert leaf_read_bytes(leaves) == leaf_read_bytes(part_spans(pack))  # the same bytes, fewer reads
    # a plain GGUF: a leaf's parts lie in three tensors, far apart: each stays a read of its own
    gspans = part_spans(tiny_model("qwen3moe", "f16"))
    assert leaf_spans(gspans) == sorted(gspans, key=lambda s: (s.layer, s.expert, str(s.path), s.offset))


def test_read_curve_reads_at_each_concurrency(pack_of: Callable[[str, str], Path]) -> None:
    spans = part_spans(pack_of("qwen3moe", "f16"))
    total = sum(s.length for s in spans)
    curve = random_read_curve(spans, readers=(1, 3), min_bytes=2 * total)  # more than the pack: two passes
    assert curve.sweeps == 2 and curve.as_dict()["sweeps"] == 2  # 1, 3, then 3, 1: each point their mean
    assert set(curve.bytes_per_second) == {1, 3} and all(v > 0 for v in curve.bytes_per_second.values())
    assert 2 * total <= curve.bytes_per_level < 2 * total + max(s.length for s in spans)
    assert curve.best == max(curve.as_dict()["peak_bytes_per_second"].values()) >= max(curve.bytes_per_second.values())
    assert curve.best_readers in (1, 3)
    d = curve.as_dict()
    assert d["bytes_per_second"].keys() == {"1", "3"} and d["span_bytes"][0] <= d["span_bytes"][1]


@pytest.mark.parametrize(("points", "readers"), [
    ({1: 2.52, 2: 2.35, 4: 1.94, 8: 2.37, 16: 1.73}, 8),  # flat: the best point (1) is noise
    ({1: 0.46, 2: 0.91, 4: 1.14, 8: 1.62, 16: 1.89}, 16),  # latency-bound: the most readers
    ({1: 1.69, 2: 1.74, 4: 1.67, 8: 1.57, 16: 1.38}, 4),
    ({1: 2.0, 2: 1.0, 4: 0.9}, 1),  # one reader far ahead: the best point
    ({1: 0.93, 2: 0.82, 4: 0.81, 8: 0.86, 16: 0.86}, 4),  # flat beyond one reader (bench run 49)
    ({1: 0.81, 2: 0.90, 4: 0.90, 8: 0.94, 16: 0.91}, 4),  # whole 192 KiB leaves (bench run 63): not 2
])
def test_pager_readers_are_the_fewest_near_the_best_and_at_least_four(points: dict[int, float], readers: int) -> None:
    curve = ReadCurve({k: v * 1e9 for k, v in points.items()}, (1 << 20, 1 << 20), 256 << 20, True)
    assert curve.pager_readers == readers and curve.as_dict()["pager_readers"] == readers


def test_each_concurrency_is_the_mean_of_a_sweep_up_and_one_down(pack_of: Callable[[str, str], Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that bursts on the first reads (then throttles) would make the first concurrency
    tried look best; read up and back down, each point is the mean of both."""
    from smoe_gguf.devtools import diskprobe

    order: list[int] = []
    burst = iter([2.0e9, 1.0e9, 1.0e9, 1.0e9, 1.0e9, 1.0e9])  # the first read bursts

    def fake_read_all(todo, n_readers, buf_bytes, direct):
        order.append(n_readers)
        return next(burst)

    monkeypatch.setattr(diskprobe, "_read_all", fake_read_all)
    curve = random_read_curve(part_spans(pack_of("qwen3moe", "f16")), readers=(1, 2), min_bytes=1 << 20)
    assert order == [1, 2, 2, 1]
    assert curve.bytes_per_second == {1: 1.5e9, 2: 1.0e9}
    assert curve.best == 2.0e9 and curve.best_readers == 1  # the limit: the fastest read seen
    assert curve.as_dict()["peak_bytes_per_second"] == {"1": 2.0e9, "2": 1.0e9}
    one = random_read_curve(part_spans(pack_of("qwen3moe", "f16")), readers=(1, 2), min_bytes=1 << 20, sweeps=1)
    assert one.sweeps == 1 and order == [1, 2, 2, 1, 1, 2]


def test_block_stat_counters() -> None:
    # a kernel's /sys/dev/block/MAJ:MIN/stat line: sectors read is the third field, io_ticks (ms) the tenth
    line = "  7805912  6264974 15196407538 28325274   106890   157282 109398936   950949        0  6112644 29347849\n"
    assert parse_block_stat(line) == DeviceCounters(6112.644, 15196407538 * 512)
    assert DeviceCounters(5.0, 1000) - DeviceCounters(2.0, 400) == DeviceCounters(3.0, 600)
    assert DeviceCounters(5.0, 1000) + DeviceCounters(2.0, 400) == DeviceCounters(7.0, 1400)
    assert parse_block_stat("1 2 3") is None and parse_block_stat("") is None


def test_device_counters_of_a_file(tmp_path: Path) -> None:
    assert device_counters(tmp_path / "missing") is None
    c = device_counters(tmp_path)  # None on tmpfs or off Linux
    if c is not None:
        assert c.busy_seconds >= 0 and c.read_bytes >= 0
        after = device_counters(tmp_path)
        assert after is not None and after.busy_seconds >= c.busy_seconds and after.read_bytes >= c.read_bytes
