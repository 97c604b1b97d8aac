"""The pack format: split -> verify -> merge, exact, safe, and loud about bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from smoe_gguf.budget import page_cost
from smoe_gguf.devtools import stock
from smoe_gguf.devtools.testmodels import CASES
from smoe_gguf.errors import SmoeError
from smoe_gguf.gguf_layout import read_layout, read_values
from smoe_gguf.pack import manifest as mf
from smoe_gguf.pack.merge import merge
from smoe_gguf.pack.split import split
from smoe_gguf.pack.verify import verify
from smoe_gguf.source import model_identity

from .cli_helpers import run_cli

ALL = list(CASES)


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("packs")
    out = {}
    for a, d in ALL:
        out[(a, d)] = root / f"{a}-{d}.pack"
        split(tiny_model(a, d), out[(a, d)])
    return out


@pytest.mark.parametrize("arch,dtype", ALL)
def test_split_verify_merge_round_trip_is_byte_identical(arch: str, dtype: str, tiny_model, packs,
                                                         tmp_path: Path) -> None:
    src = tiny_model(arch, dtype)
    assert verify(packs[(arch, dtype)]) == []
    merged = merge(packs[(arch, dtype)], tmp_path / "merged.gguf")
    assert merged.read_bytes() == src.read_bytes()
    # And, read independently with the gguf package: every key/value and tensor equal.
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(merged)
    assert [f.name for f in a.fields.values()] == [f.name for f in b.fields.values()]
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert (ta.name, ta.tensor_type, list(ta.shape)) == (tb.name, tb.tensor_type, list(tb.shape))
        assert np.array_equal(np.asarray(ta.data).view(np.uint8), np.asarray(tb.data).view(np.uint8))


@pytest.mark.parametrize("arch,dtype", ALL)
def test_pack_layout(arch: str, dtype: str, tiny_model, packs) -> None:
    src = read_layout(tiny_model(arch, dtype))
    pack = packs[(arch, dtype)]
    m = mf.load(pack)
    core = read_layout(pack / mf.CORE_FILE)
    # The core carries every source key/value, and every tensor that is not a routed expert.
    for key, kv in src.kvs.items():
        assert core.kvs[key].raw == kv.raw
    expert_names = {p.tensor for lf in m.leaves for p in lf.parts}
    assert [t.name for t in core.tensors] == [t.name for t in src.tensors if t.name not in expert_names]
    assert m.core_bytes == sum(t.nbytes for t in core.tensors)
    assert len(m.leaves) == m.n_expert * len({lf.layer for lf in m.leaves})
    for leaf in m.leaves:
        size = (pack / leaf.file).stat().st_size
        assert size == leaf.size and size % mf.PART_ALIGNMENT == 0
        for p in leaf.parts:
            assert p.offset % mf.PART_ALIGNMENT == 0 and p.offset + p.length <= size
    assert m.source.size == src.file_size and m.source.file == src.path.name


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_read_values_match_gguf_s_own_reader(tiny_model, dtype: str) -> None:
    """What the speculator reads at start-up (routers, norms): the values gguf's reader gives,
    in numpy's order, for float and quantized tensors alike."""
    path = tiny_model("qwen3moe", dtype)
    layout = read_layout(path)
    names = [t.name for t in layout.tensors if t.name.startswith("blk.0.")]
    got = read_values(layout, names)
    want = {t.name: t for t in gguf.GGUFReader(path).tensors}
    kinds = set()
    for name in names:
        t = want[name]
        kinds.add(t.tensor_type.name)
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        assert got[name].dtype == np.float32 and np.array_equal(got[name], ref.astype(np.float32)), name
    assert "F32" in kinds and len(kinds) > 1  # norms, and the weights in the model's type


def test_some_tiny_models_have_slices_that_are_not_page_multiples(packs) -> None:
    lengths = {p.length for pack in packs.values() for lf in mf.load(pack).leaves for p in lf.parts}
    assert any(n % 4096 for n in lengths)


def test_stock_llama_generates_the_same_tokens_on_the_merged_file(tiny_model, packs, tmp_path: Path) -> None:
    src = tiny_model("qwen3moe", "q4_k")
    merged = merge(packs[("qwen3moe", "q4_k")], tmp_path / "merged.gguf")
    a = stock.greedy(src, "The quick brown fox", n_tokens=16)
    b = stock.greedy(merged, "The quick brown fox", n_tokens=16)
    assert a.tokens == b.tokens


def test_stock_llama_refuses_the_core_alone(packs) -> None:
    # The core has no expert data: llama.cpp must fail loudly, never run it with experts missing.
    with pytest.raises(SmoeError, match="split"):
        stock.greedy(packs[("qwen3moe", "f16")] / mf.CORE_FILE, "hello", n_tokens=2)


# ---- verify -------------------------------------------------------------------------------------


@pytest.fixture
def fresh_pack(tiny_model, tmp_path: Path) -> Path:
    split(tiny_model("qwen2moe", "f16"), tmp_path / "p.pack")
    return tmp_path / "p.pack"


def test_verify_sound_pack(fresh_pack: Path) -> None:
    assert verify(fresh_pack) == []
    code, stdout, _ = run_cli("verify", str(fresh_pack))
    assert code == 0 and "ok" in stdout


def test_verify_names_a_flipped_byte(fresh_pack: Path) -> None:
    m = mf.load(fresh_pack)
    leaf = m.leaf(1, 3)
    down = next(p for p in leaf.parts if p.part == "down")
    path = fresh_pack / leaf.file
    data = bytearray(path.read_bytes())
    data[down.offset + 7] ^= 0x01
    path.write_bytes(bytes(data))
    faults = [str(f) for f in verify(fresh_pack)]
    assert faults == ["layer 1 expert 3 part down: checksum mismatch in " + leaf.file]
    assert verify(fresh_pack, quick=True) == []  # sizes only: a flipped byte passes --quick
    code, _, stderr = run_cli("verify", str(fresh_pack))
    assert code == 1 and "layer 1 expert 3 part down" in stderr and "1 fault" in stderr


def test_verify_names_a_truncated_and_a_missing_shard(fresh_pack: Path) -> None:
    m = mf.load(fresh_pack)
    trunc, gone = m.leaf(0, 2), m.leaf(1, 0)
    with open(fresh_pack / trunc.file, "r+b") as f:
        f.truncate(trunc.parts[-1].offset + 1)
    (fresh_pack / gone.file).unlink()
    for quick in (False, True):
        faults = [str(f) for f in verify(fresh_pack, quick=quick)]
        assert f"layer 0 expert 2 part {trunc.parts[-1].part}: shard {trunc.file} is truncated" in " ".join(faults)
        assert all(any(f.startswith(f"layer 1 expert 0 part {p.part}: shard {gone.file} is missing") for f in faults) for p in gone.parts)
    code, _, stderr = run_cli("verify", "--quick", str(fresh_pack))
    assert code == 1 and "layer 0 expert 2" in stderr and "layer 1 expert 0" in stderr


def test_merge_refuses_a_corrupt_pack_naming_the_leaf(fresh_pack: Path, tmp_path: Path) -> None:
    leaf = mf.load(fresh_pack).leaf(0, 1)
    path = fresh_pack / leaf.file
    data = bytearray(path.read_bytes())
    data[leaf.parts[0].offset] ^= 0xFF
    path.write_bytes(bytes(data))
    out = tmp_path / "m.gguf"
    code, _, stderr = run_cli("merge", str(fresh_pack), "-o", str(out))
    assert code == 1 and f"layer 0 expert 1 part {leaf.parts[0].part}: checksum mismatch" in stderr
    assert not out.exists() and not list(tmp_path.glob(".m.gguf.partial*"))


# ---- refusals -----------------------------------------------------------------------------------


def _dense_model(path: Path) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 16), np.float32))
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((32, 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_refuses_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, I am not a model\n")
    for cmd in (["split", str(bad), "-o", str(tmp_path / "out")], ["inspect", str(bad)]):
        code, _, stderr = run_cli(*cmd)
        assert code == 1 and "not a GGUF file" in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_refuses_a_truncated_gguf(tiny_model, tmp_path: Path) -> None:
    src = tiny_model("qwen3moe", "f16")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size - 5000])
    code, _, stderr = run_cli("split", str(cut), "-o", str(tmp_path / "out"))
    assert code == 1 and "truncated GGUF" in stderr
    head = tmp_path / "head.gguf"
    head.write_bytes(src.read_bytes()[:100])
    code, _, stderr = run_cli("split", str(head), "-o", str(tmp_path / "out"))
    assert code == 1 and "truncated GGUF header" in stderr
    assert not (tmp_path / "out").exists()


def test_refuses_a_dense_model_and_inspect_says_dense(tmp_path: Path) -> None:
    dense = _dense_model(tmp_path / "dense.gguf")
    code, _, stderr = run_cli("split", str(dense), "-o", str(tmp_path / "out"))
    assert code == 1 and "dense model" in stderr
    code, stdout, _ = run_cli("inspect", "--json", str(dense))
    assert code == 0 and json.loads(stdout)["moe"] is False


def test_refuses_an_existing_output_unless_forced(tiny_model, tmp_path: Path) -> None:
    src = tiny_model("qwen3moe", "f16")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, stderr = run_cli("split", str(src), "-o", str(out))
    assert code == 1 and "already exists (use --force" in stderr
    assert (out / "keep.txt").read_text() == "mine"
    code, _, stderr = run_cli("split", "-q", str(src), "-o", str(out), "--force")  # not a pack: never replaced
    assert code == 1 and "--force replaces only a pack" in stderr and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    for _ in range(2):  # an empty directory, then the pack written there
        code, _, _ = run_cli("split", "-q", str(src), "-o", str(out), "--force")
        assert code == 0 and verify(out) == []


def test_refuses_when_the_disk_is_too_small(tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))
    code, _, stderr = run_cli("split", str(tiny_model("qwen3moe", "f16")), "-o", str(tmp_path / "out"))
    assert code == 1 and "not enough free disk" in stderr and "MiB free" in stderr
    assert not (tmp_path / "out").exists()


def test_an_interrupted_split_leaves_nothing(tiny_model, tmp_path: Path) -> None:
    def interrupt(done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        split(tiny_model("qwen3moe", "f16"), tmp_path / "out", progress=interrupt)
    assert os.listdir(tmp_path) == []


def test_inspect_reports_the_moe_layout(tiny_model) -> None:
    code, stdout, _ = run_cli("inspect", "--json", str(tiny_model("qwen2moe", "f16")))
    info = json.loads(stdout)
    assert code == 0 and info["moe"] and info["architecture"] == "qwen2moe"
    assert info["shared_experts"] >= 1 and info["shared_expert_bytes"] > 0
    assert info["leaf_bytes"] == sum(info["part_bytes"].values())
    # the minimum is what the engine charges: each part's page footprint, one token's leaves
    cost = sum(page_cost(n) for n in info["part_bytes"].values())
    assert info["min_budget_bytes"] == cost * info["experts_used_per_token"] > info["leaf_bytes"] * info["experts_used_per_token"]
    assert info["total_expert_bytes"] == info["leaf_bytes"] * info["leaves"]
    assert info["dense_core_bytes"] + info["total_expert_bytes"] < info["file_bytes"]


def test_inspect_shows_each_parts_types_in_a_quant_mix(tiny_model) -> None:
    path = tiny_model("qwen3moe", "q4_k_m")
    code, stdout, _ = run_cli("inspect", "--json", str(path))
    info = json.loads(stdout)
    assert code == 0 and info["support"] == "tested"
    assert info["part_types"] == {"gate": "Q4_K", "up": "Q4_K", "down": "Q4_K/Q6_K"}
    assert info["leaf_bytes"] == sum(info["part_bytes"].values())  # the largest leaf's parts
    code, stdout, _ = run_cli("inspect", str(path))
    assert code == 0 and "Q4_K/Q6_K" in stdout and "tested" in stdout


def _unknown_moe_model(path: Path) -> Path:
    """A MoE GGUF of an architecture llama.cpp knows (phimoe) and smoe-gguf's table does not."""
    w = gguf.GGUFWriter(path, "phimoe")
    w.add_block_count(1)
    w.add_expert_count(4)
    w.add_expert_used_count(2)
    w.add_tensor("token_embd.weight", np.zeros((8, 16), np.float32))
    for part, shape in (("gate", (4, 32, 16)), ("up", (4, 32, 16)), ("down", (4, 16, 32))):
        w.add_tensor(f"blk.0.ffn_{part}_exps.weight", np.zeros(shape, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_an_unknown_moe_architecture_is_refused_and_named(tmp_path: Path) -> None:
    src = _unknown_moe_model(tmp_path / "phi.gguf")
    for cmd in (["split", str(src), "-o", str(tmp_path / "out")], ["run", str(src), "-p", "hi", "-n", "1"]):
        code, stdout, stderr = run_cli(*cmd)
        assert code == 1 and stdout == "", cmd
        assert len(stderr.strip().splitlines()) == 1, stderr
        assert "MoE architecture 'phimoe' is unsupported" in stderr and "not in smoe-gguf's architecture table" in stderr
    assert not (tmp_path / "out").exists()
    code, stdout, _ = run_cli("inspect", "--json", str(src))
    info = json.loads(stdout)
    assert code == 0 and info["moe"] and info["support"] == "unsupported"


def test_run_refuses_a_pack_of_an_unsupported_architecture(tiny_model, tmp_path: Path) -> None:
    pack = tmp_path / "p.pack"
    split(tiny_model("qwen3moe", "f16"), pack)
    manifest = json.loads((pack / mf.MANIFEST).read_text())
    (pack / mf.MANIFEST).write_text(json.dumps({**manifest, "arch": "phimoe"}))
    code, _, stderr = run_cli("run", str(pack), "-p", "hi", "-n", "1")
    assert code == 1 and "MoE architecture 'phimoe' is unsupported" in stderr


def test_a_pack_shares_its_sources_identity(tiny_model, packs, tmp_path: Path) -> None:
    """Profiles are keyed by the model's identity: a GGUF's and its pack's are the same, a pack
    split before the identity was recorded keeps the source's sha256, and a malformed one is refused."""
    src, pack = tiny_model("qwen2moe", "f16"), packs[("qwen2moe", "f16")]
    m = mf.load(pack)
    assert model_identity(pack) == model_identity(src)
    assert m.source_id == model_identity(src)[0] != m.source.sha256
    old = tmp_path / "old.pack"
    shutil.copytree(pack, old)
    raw = json.loads((old / mf.MANIFEST).read_text())
    del raw["source_id"]
    (old / mf.MANIFEST).write_text(json.dumps(raw))
    assert model_identity(old)[0] == m.source.sha256
    raw["source_id"] = "not a digest"
    (old / mf.MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(SmoeError, match="source_id"):
        mf.load(old)
