"""Hostile and careless input (issue 18): every case ends in one clear line and exit status 1
(2 for a bad option value, 130 for an interrupt), never a wrong answer, a changed input file, a
hang or a traceback. Tests are numbered after the issue's items."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from smoe_gguf.gguf_layout import T_INT32, T_UINT32, read_layout
from smoe_gguf.pack import manifest as mf
from smoe_gguf.pack import split as split_mod
from smoe_gguf.source import model_identity

from .cli_helpers import run_cli
from .hostile_helpers import (
    ROOT,
    kv,
    nested_array_kv,
    one_error,
    rewrite_gguf,
    run_child,
    snapshot,
    string_kv,
)

PROMPT = "The quick brown fox"
RUN = ["-n", "3", "--budget", "100%", "--no-profile", "--threads", "1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def model(tiny_model, root: Path) -> Path:
    dst = root / "model.gguf"
    shutil.copyfile(tiny_model("qwen3moe", "f32"), dst)
    return dst


@pytest.fixture(scope="module")
def pack(model: Path, root: Path) -> Path:
    code, _, stderr = run_cli("split", "-q", str(model), "-o", str(root / "pack"))
    assert code == 0, stderr
    return root / "pack"


@pytest.fixture(scope="module")
def stock_tokens(pack: Path) -> list[int]:
    code, stdout, stderr = run_cli("run", str(pack), "-p", PROMPT, *RUN, "--json")
    assert code == 0, stderr
    return json.loads(stdout)["tokens"]


@pytest.fixture(scope="module")
def trace(pack: Path, root: Path) -> Path:
    path = root / "trace.jsonl"
    code, _, stderr = run_cli("run", str(pack), "-p", PROMPT, "-n", "4", "--budget", "25%", "--no-profile",
                              "--threads", "1", "--trace", str(path), "--json")
    assert code == 0, stderr
    return path


def fresh(pack: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pack"
    shutil.copytree(pack, dst)
    return dst


def edit_manifest(pack: Path, change) -> None:
    path = pack / mf.MANIFEST
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def run_pack(pack: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli("run", str(pack), "-p", PROMPT, *RUN, *extra)


# ---------------------------------------------------------------- wrong output, silently (1-4)


def test_01_run_checks_the_core_before_loading_it(pack: Path, tmp_path: Path) -> None:
    p = fresh(pack, tmp_path)
    code, _, stderr = run_pack(p)
    assert code == 0, stderr  # the first run hashes the core and remembers it
    core = p / mf.CORE_FILE
    data = bytearray(core.read_bytes())
    at = read_layout(core).tensors[-1].offset
    data[at:at + 65536] = bytes(len(data[at:at + 65536]))
    core.write_bytes(data)
    before = snapshot(p)
    one_error(run_pack(p), 1, "core.gguf: checksum mismatch")
    assert snapshot(p) == before


def test_02_the_manifest_cannot_point_the_core_elsewhere(pack: Path, tmp_path: Path) -> None:
    p = fresh(pack, tmp_path)
    shutil.copyfile(p / mf.CORE_FILE, p / "other.gguf")
    edit_manifest(p, lambda m: m["core"].update(file="other.gguf"))
    for args in (["verify", str(p)], ["run", str(p), "-p", PROMPT, *RUN]):
        one_error(run_cli(*args), 1, "malformed manifest", "a pack's is always core.gguf")


@pytest.mark.parametrize("target", ["/etc/passwd", "../../../etc/passwd", "/dev/zero", "model.gguf",
                                    "leaves/000/../../model.gguf"])
def test_03_leaf_paths_stay_inside_the_pack(pack: Path, model: Path, tmp_path: Path, target: str) -> None:
    p = fresh(pack, tmp_path)
    shutil.copyfile(model, tmp_path / "model.gguf")
    edit_manifest(p, lambda m: m["leaves"][1].update(file=target))
    before = snapshot(p, model)
    for args in (["verify", str(p)], ["merge", str(p), "-o", str(tmp_path / "out.gguf")],
                 ["run", str(p), "-p", PROMPT, *RUN]):
        one_error(run_cli(*args), 1, "malformed manifest", "a pack's is always leaves/000/0001.leaf")
    assert snapshot(p, model) == before and not (tmp_path / "out.gguf").exists()


def test_03_a_leaf_or_the_leaves_directory_linked_elsewhere_is_refused(pack: Path, tmp_path: Path) -> None:
    p = fresh(pack, tmp_path)
    leaf = p / mf.leaf_file(0, 1)
    leaf.unlink()
    leaf.symlink_to("/dev/zero")
    code, _, stderr = run_cli("verify", str(p))
    assert code == 1 and "layer 0 expert 1 part gate: shard" in stderr and "is a symbolic link" in stderr
    # The whole layer directory, a link to a copy elsewhere: the bytes would pass every checksum.
    q = tmp_path / "q"
    shutil.copytree(pack, q)
    shutil.move(str(q / "leaves" / "000"), tmp_path / "elsewhere")
    (q / "leaves" / "000").symlink_to(tmp_path / "elsewhere")
    code, _, stderr = run_cli("verify", str(q))
    assert code == 1 and "leads outside the pack" in stderr
    one_error(run_pack(q, "--budget", "100%"), 1, "leads outside the pack")


def test_04_checksums_never_is_documented_as_unsafe_and_warns(pack: Path) -> None:
    code, stdout, _ = run_cli("run", "--help")
    assert code == 0 and "unsafe" in stdout
    readme = (ROOT / "README.md").read_text()
    assert "--checksums never" in readme and "unsafe" in readme.split("--checksums never", 1)[1][:400]
    code, _, stderr = run_pack(pack, "--checksums", "never")
    assert code == 0 and "warning: --checksums never: leaf bytes are not checked" in stderr


# ---------------------------------------------------------------- hangs and aborts (5-8)


def test_05_a_fifo_leaf_is_refused_without_hanging(pack: Path, tmp_path: Path) -> None:
    p = fresh(pack, tmp_path)
    for e in range(mf.load(p).n_expert):  # every leaf of layer 0: whichever the prompt selects
        (p / mf.leaf_file(0, e)).unlink()
        os.mkfifo(p / mf.leaf_file(0, e))
    code, _, stderr = run_child("run", str(p), "-p", PROMPT, *RUN, timeout=60)
    one_error((code, "", stderr), 1, "is a FIFO (named pipe), not a regular file")
    code, _, stderr = run_child("merge", str(p), "-o", str(tmp_path / "out.gguf"), timeout=60)
    one_error((code, "", stderr), 1, "layer 0 expert 0 part gate: shard", "is a FIFO")
    code, _, stderr = run_child("verify", str(p), timeout=60)
    assert code == 1 and "is a FIFO" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("extra", [["--ctx", "8"], ["--ctx", "100", "--long"], ["--ctx", "8", "--chat"]])
def test_06_a_context_below_the_micro_batch_does_not_abort(pack: Path, extra: list[str]) -> None:
    prompt = " ".join(["word"] * 150) if "--long" in extra else PROMPT
    args = [x for x in extra if x != "--long"]
    code, stdout, stderr = run_child("run", str(pack), "-p", prompt, *RUN, *args, "--json", timeout=120)
    assert code == 0 and "GGML_ASSERT" not in stderr, stderr
    assert len(json.loads(stdout)["tokens"]) == 3
    code, _, stderr = run_child("chat", str(pack), "--ctx", "8", "-n", "2", "--budget", "100%", timeout=120,
                                stdin="hello there\n") if "--chat" in extra else (0, "", "")
    assert code == 0 and "GGML_ASSERT" not in stderr, stderr


@pytest.mark.parametrize("key", ["block_count", "expert_used_count", "expert_count"])
@pytest.mark.parametrize("value", [0, 1000, 2**32 - 1])
def test_07_moe_keys_out_of_llama_cpp_range(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            key: str, value: int) -> None:
    bad = rewrite_gguf(model, tmp_path / "bad.gguf", kvs={f"qwen3moe.{key}": kv(f"qwen3moe.{key}", T_UINT32, value)})
    before = snapshot(bad)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    needle = "expert_count is 0" if (key, value) == ("expert_count", 0) else f"key 'qwen3moe.{key}' is {value}"
    for args in (["inspect", str(bad)], ["split", str(bad), "-o", str(tmp_path / "out")],
                 ["run", str(bad), "-p", PROMPT, *RUN]):
        one_error(run_cli(*args), 1, needle)
    assert snapshot(bad) == before and not list(tmp_path.glob("smoe-stub-*")) and not (tmp_path / "out").exists()


def test_08_an_absurd_context_is_refused_before_llama_cpp_allocates(pack: Path) -> None:
    one_error(run_pack(pack, "--ctx", "100000000"), 2, "--ctx 100000000 is far beyond the 4096 tokens")
    one_error(run_pack(pack, "--ctx", "0"), 2, "--ctx must be between 1")
    one_error(run_cli("chat", str(pack), "--ctx", "99999999999"), 2, "--ctx must be between 1")


# ---------------------------------------------------------------- data loss (9-11)


def test_09_split_force_never_replaces_what_is_not_a_pack(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    one_error(run_cli("split", "-q", str(model), "-o", str(out), "--force"), 1, "--force replaces only a pack")
    (tmp_path / "file").write_text("mine")
    one_error(run_cli("split", "-q", str(model), "-o", str(tmp_path / "file"), "--force"), 1,
              "is not a pack directory; not replaced")
    assert (out / "notes.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["file", "mine"]


def test_10_outputs_never_overwrite_an_input(model: Path, pack: Path, tmp_path: Path) -> None:
    p = fresh(pack, tmp_path)
    m = tmp_path / "model.gguf"
    shutil.copyfile(model, m)
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(p, m, tmp_path / "notes.txt")
    one_error(run_cli("run", str(m), "-p", PROMPT, *RUN, "--trace", str(m)), 1, "is the model")
    one_error(run_pack(p, "--trace", str(p / mf.MANIFEST)), 1, "is inside the pack")
    one_error(run_cli("run", str(m), "-p", PROMPT, "-n", "2", "--budget", "50%", "--profile", str(m)), 1,
              "is the model")
    one_error(run_cli("profile", str(p), "--show", "--profile", str(p / mf.CORE_FILE)), 1, "is inside the pack")
    one_error(run_cli("merge", str(p), "-o", str(p / mf.CORE_FILE), "--force"), 1, "is inside the pack")
    one_error(run_pack(p, "--trace", str(tmp_path / "notes.txt")), 1, "exists and is not a trace")
    one_error(run_cli("merge", str(p), "-o", str(tmp_path / "notes.txt"), "--force"), 1, "is not a GGUF file")
    one_error(run_cli("run", str(p), "-p", PROMPT, "--trace", str(tmp_path / "t"), "--profile", str(tmp_path / "t")),
              2, "the same file")
    assert snapshot(p, m, tmp_path / "notes.txt") == before


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_11_leftovers_of_killed_splits_are_cleaned(model: Path, tmp_path: Path) -> None:
    dead = _dead_pid()
    for kind in ("partial", "old"):
        junk = tmp_path / f".out.{kind}-{dead}"
        (junk / "leaves").mkdir(parents=True)
        (junk / "core.gguf").write_bytes(b"x" * 1000)
    alive = tmp_path / f".out.partial-{os.getppid()}"  # a live process's: left alone
    alive.mkdir()
    code, _, stderr = run_cli("split", "-q", str(model), "-o", str(tmp_path / "out"))
    assert code == 0, stderr
    assert sorted(os.listdir(tmp_path)) == sorted(["out", alive.name])


def test_11_sigterm_during_split_leaves_nothing(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = split_mod._write_pack

    def write_then_terminated(m, d, progress):
        real(m, d, progress)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(split_mod, "_write_pack", write_then_terminated)
    one_error(run_cli("split", "-q", str(model), "-o", str(tmp_path / "out")), 128 + signal.SIGTERM,
              "terminated by SIGTERM")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- tracebacks instead of one line (12-17)


def _profile(pack: Path, path: Path, **change) -> Path:
    model_id, n_layer, n_expert = model_identity(pack)
    d = {"format": "smoe-profile", "version": 1, "model": model_id, "n_layer": n_layer, "n_expert": n_expert,
         "sessions": 1, "usage": [[0.0] * n_expert for _ in range(n_layer)], "windows": [], "tree": None, **change}
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("case", ["window key", "window list", "tree leaf", "deep", "huge"])
def test_12_a_bad_profile_is_ignored_with_a_warning_and_replaced(pack: Path, tmp_path: Path, case: str) -> None:
    path = tmp_path / "p.json"
    if case == "window key":
        _profile(pack, path, windows=[[1.0, {"99999": 1.0}]])
    elif case == "window list":
        _profile(pack, path, windows=[[1.0, [1, 2, 3]]])
    elif case == "tree leaf":
        _profile(pack, path, tree={"weight": 1.0, "leaves": [[0, 999, 0.5]], "children": []})
    elif case == "deep":
        path.write_text('{"format": "smoe-profile", "a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    else:
        _profile(pack, path, windows=[[1.0, {"0": 1.0}]] * 200_000)
    code, _, stderr = run_cli("run", str(pack), "-p", PROMPT, "-n", "2", "--budget", "25%", "--threads", "1",
                              "--profile", str(path))
    assert code == 0 and "Traceback" not in stderr, stderr
    assert f"warning: profile {path}" in stderr and "a new one replaces it" in stderr
    saved = json.loads(path.read_text())  # replaced by this session's, which a later run reads silently
    assert saved["format"] == "smoe-profile" and saved["sessions"] == 1
    code, _, stderr = run_cli("profile", str(pack), "--show", "--profile", str(path))
    assert code == 0 and "warning" not in stderr


@pytest.mark.parametrize("case,needle", [
    ("alignment 0", "general.alignment 0 is not a power of two"),
    ("alignment 3", "general.alignment 3 is not a power of two"),
    ("alignment -32", "general.alignment must be a uint32, not int32"),
    ("alignment string", "general.alignment must be a uint32, not string"),
    ("expert_count string", "key 'qwen3moe.expert_count' is a string, not an integer"),
    ("split.count string", "key 'split.count' is a string, not an integer"),
    ("nested arrays", "is an array of arrays"),
    ("duplicate tensor", "duplicate tensor name 'blk.0.ffn_up_exps.weight'"),
    ("duplicate key", "duplicate key"),
    ("million tensors", "1000000 tensors; at most 65536"),
])
def test_13_hostile_gguf_values(model: Path, tmp_path: Path, case: str, needle: str) -> None:
    bad = tmp_path / "bad.gguf"
    if case.startswith("alignment"):
        value = case.split()[1]
        blob = (string_kv("general.alignment", value) if value == "string" else
                kv("general.alignment", T_INT32, int(value)) if value.startswith("-") else
                kv("general.alignment", T_UINT32, int(value)))
        rewrite_gguf(model, bad, kvs={"general.alignment": blob})
    elif case == "expert_count string":
        rewrite_gguf(model, bad, kvs={"qwen3moe.expert_count": string_kv("qwen3moe.expert_count", "16")})
    elif case == "split.count string":
        rewrite_gguf(model, bad, kvs={"split.count": string_kv("split.count", "2")})
    elif case == "nested arrays":
        rewrite_gguf(model, bad, kvs={"x.nested": nested_array_kv("x.nested", 100_000)})
    elif case == "duplicate tensor":
        data = model.read_bytes()
        start = read_layout(model).kv_end
        at = data.index(b"blk.1.ffn_up_exps.weight", start)
        bad.write_bytes(data[:at] + b"blk.0" + data[at + 5:])
    elif case == "duplicate key":  # general.architecture twice
        rewrite_gguf(model, bad, kvs={"again": read_layout(model).kvs["general.architecture"].raw})
    else:
        with open(bad, "wb") as f:
            f.write(b"GGUF" + (3).to_bytes(4, "little") + (1_000_000).to_bytes(8, "little") + bytes(8))
            f.truncate(24 << 20)
    before = snapshot(bad)
    for args in (["inspect", str(bad)], ["split", str(bad), "-o", str(tmp_path / "out")],
                 ["run", str(bad), "-p", PROMPT, *RUN]):
        one_error(run_cli(*args), 1, needle)
    assert snapshot(bad) == before and not (tmp_path / "out").exists()


def _drop_leaf(m):
    m["leaves"].pop(5)


def _dup_leaf(m):
    m["leaves"].append(m["leaves"][0])


def _layer(m):
    m["leaves"][3]["layer"] = 99


def _n_expert(m):
    m["n_expert"] -= 1


def _used(m):
    m["n_expert_used"] = 0


def _align(m):
    m["alignment"] = 0


def _offset(m):
    m["leaves"][0]["parts"][1]["offset"] = -4096


def _length(m):
    m["leaves"][0]["parts"][0]["length"] = 2**62


@pytest.mark.parametrize("change,needle", [
    (_drop_leaf, "the leaf of layer 0 expert 5 is missing"),
    (_dup_leaf, "leaf of layer 0 expert 0 is listed twice"),
    (_layer, "layer is 99"),
    (_n_expert, "expected outermost dim 15"),
    (_used, "n_expert_used is 0"),
    (_align, "alignment is 0"),
    (_offset, "offset is -4096"),
    (_length, "length 4611686018427387904"),
])
def test_14_manifest_structure(pack: Path, tmp_path: Path, change, needle: str) -> None:
    p = fresh(pack, tmp_path)
    edit_manifest(p, change)
    before = snapshot(p)
    for args in (["verify", str(p)], ["merge", str(p), "-o", str(tmp_path / "out.gguf")],
                 ["run", str(p), "-p", PROMPT, *RUN]):
        one_error(run_cli(*args), 1, "malformed manifest", needle)
    assert snapshot(p) == before


def test_15_environment_errors(model: Path, pack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = fresh(pack, tmp_path)
    # An unreadable leaf (as root, permissions do not stop a read: the refusal is simulated).
    import smoe_gguf.safeio as safeio

    real_open = os.open

    def deny(path, flags, *a):
        if str(path).endswith(".leaf") and "0001" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(safeio.os, "open", deny)
    code, _, stderr = run_cli("verify", str(p))
    assert code == 1 and "cannot open: Permission denied" in stderr
    one_error(run_cli("merge", str(p), "-o", str(tmp_path / "o.gguf")), 1, "Permission denied")
    monkeypatch.undo()
    # No space left, or a read-only file system, while split or merge writes: one line, nothing left.
    for err_no in (errno.ENOSPC, errno.EROFS):
        def full(*_a, err_no=err_no):
            raise OSError(err_no, os.strerror(err_no))

        monkeypatch.setattr(split_mod, "_write_pack", full)
        one_error(run_cli("split", "-q", str(model), "-o", str(tmp_path / "s")), 1, os.strerror(err_no))
        monkeypatch.undo()
    import smoe_gguf.pack.merge as merge_mod

    monkeypatch.setattr(merge_mod, "_write", lambda *_a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    one_error(run_cli("merge", str(p), "-o", str(tmp_path / "m.gguf")), 1, "No space left on device")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["pack"]
    # -o onto a directory, under a file; the current directory; a pack without its core.
    (tmp_path / "f").write_text("x")
    one_error(run_cli("merge", str(p), "-o", str(tmp_path)), 1, "is a directory; not replaced")
    one_error(run_cli("merge", str(p), "-o", str(tmp_path / "f" / "x.gguf")), 1, "is not a directory")
    one_error(run_cli("split", "-q", str(model), "-o", str(tmp_path / "f" / "x")), 1, "is not a directory")
    monkeypatch.chdir(tmp_path / "pack" / "leaves")
    one_error(run_cli("split", "-q", str(model), "-o", ".", "--force"), 1, "is the current directory")
    one_error(run_cli("split", "-q", str(model), "-o", str(p), "--force"), 1, "is the current directory")
    monkeypatch.chdir(ROOT)
    (p / mf.CORE_FILE).unlink()
    one_error(run_cli("merge", str(p), "-o", str(tmp_path / "m.gguf")), 1, "core.gguf: missing")
    one_error(run_pack(p), 1, "core.gguf")
    # A trace to a full device.
    one_error(run_cli("run", str(pack), "-p", PROMPT, *RUN, "--trace", "/dev/full"), 1,
              "cannot write trace /dev/full: No space left on device")


def test_16_invalid_utf8_in_the_prompt(pack: Path) -> None:
    bad = b"hello \xff\xfe".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    code, stdout, stderr = run_cli("run", str(pack), "-p", bad, *RUN, "--json")
    assert code == 0 and len(json.loads(stdout)["tokens"]) == 3, stderr
    code, _, stderr = run_cli("run", str(pack), "-p", "hi", "--chat", "--system", bad, *RUN)
    assert code == 0, stderr


def _trace_lines(trace: Path) -> list[dict]:
    return [json.loads(line) for line in trace.read_text().splitlines()]


@pytest.mark.parametrize("case,needle", [
    ("missing key", "malformed trace line"),
    ("header list", "is not a smoe-gguf trace"),
    ("ids not a list", "malformed trace line"),
    ("row too short", "malformed trace line"),
    ("huge id", "an expert id is"),
    ("deep", "malformed trace line (not JSON)"),
    ("huge n_expert", "n_expert is"),
    ("negative leaf_cost", "leaf_cost of layer 0 is -"),
    ("expert -1", "an expert id is -1"),
    ("float id", "an expert id is 1.0"),
    ("layer without cost", "has no leaf cost"),
    ("stage costs off the leaf's", "its leaf_cost is"),
])
def test_17_malformed_traces(trace: Path, tmp_path: Path, case: str, needle: str) -> None:
    lines = _trace_lines(trace)
    head, ev = lines[0], lines[1]
    if case == "missing key":
        del ev["l"]
    elif case == "header list":
        lines[0] = [head]
    elif case == "ids not a list":
        ev["ids"] = 7
    elif case == "row too short":
        ev["ids"] = [[1]]
    elif case == "huge id":
        ev["ids"][0][0] = 10**30
    elif case == "huge n_expert":
        head["n_expert"] = 2**40
    elif case == "negative leaf_cost":
        head["leaf_cost"]["0"] = -head["leaf_cost"]["0"]
    elif case == "expert -1":
        ev["ids"][0][0] = -1
    elif case == "float id":
        ev["ids"][0][0] = 1.0
    elif case == "layer without cost":
        ev["l"] = 77
    elif case == "stage costs off the leaf's":
        head["stage_cost"] = {k: [v, 1] for k, v in head["leaf_cost"].items()}
    text = "\n".join(json.dumps(x) for x in lines) + "\n"
    if case == "deep":
        text += "[" * 100_000 + "]" * 100_000 + "\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    one_error(run_cli("replay", str(bad)), 1, needle)


# ---------------------------------------------------------------- resource and clarity (18-21)


def test_18_huge_inputs_are_refused_by_their_size(pack: Path, tmp_path: Path) -> None:
    # The million-tensor GGUF is in test_13; a profile many times the size this model can need:
    path = _profile(pack, tmp_path / "p.json", windows=[[1.0, {"0": 1.0}]] * 300_000)
    code, _, stderr = run_cli("profile", str(pack), "--show", "--profile", str(path))
    assert code == 0 and "bytes, more than the" in stderr and "a new one replaces it" in stderr


@pytest.mark.parametrize("budget", ["25%", "100%"])  # 374 tokens, paged; every leaf (no signal held once filled)
def test_19_ctrl_c_while_decoding_is_an_interrupt(pack: Path, budget: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "from smoe_gguf.cli import main; main()", "run", str(pack),
                             "-p", "a b c", "-n", "4000", "--ctx", "4096", "--budget", budget,
                             "--no-profile", "--threads", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.read(3)  # decoding has started
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and stderr.decode().strip().splitlines()[-1] == "interrupted", stderr


def test_19_signals_while_llama_cpp_computes_are_held_and_delivered_after() -> None:
    from smoe_gguf.llama_session import signals_deferred

    got: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, _frame: got.append(signum))
    try:
        with signals_deferred():
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
            assert got == []  # held: a handler here would run inside llama.cpp's callbacks
        assert got == [signal.SIGTERM]  # the first one, once the computation is over
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are back
    finally:
        signal.signal(signal.SIGTERM, before)


def test_19_an_interrupt_inside_the_gate_is_an_interrupt() -> None:
    from smoe_gguf.gate import KIND_BEFORE_DOWN, Gate

    def on_node(*_a):
        raise KeyboardInterrupt

    gate = Gate(lambda layer, ids: None, n_layer=2, n_expert=4, on_node=on_node)
    assert gate._on_slow(0, KIND_BEFORE_DOWN, 0, 1) == 0  # the graph is stopped
    with pytest.raises(KeyboardInterrupt):
        gate.check()


@pytest.mark.parametrize("command", ["split", "merge"])
def test_19_split_and_merge_say_interrupted(model: Path, pack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            command: str) -> None:
    import smoe_gguf.pack.merge as merge_mod

    def interrupt(*_a):
        raise KeyboardInterrupt

    if command == "split":
        monkeypatch.setattr(split_mod, "_write_pack", interrupt)
        args = ["split", "-q", str(model), "-o", str(tmp_path / "out")]
    else:
        monkeypatch.setattr(merge_mod, "_write", interrupt)
        args = ["merge", str(pack), "-o", str(tmp_path / "out.gguf")]
    one_error(run_cli(*args), 130, "interrupted")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", ["inspect", "split"])
def test_20_not_a_file_is_said_as_such(command: str, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    extra = ["-o", str(tmp_path / "out")] if command == "split" else []
    for path, what in ((tmp_path / "fifo", "is a FIFO"), (tmp_path, "is a directory"), ("/dev/zero", "is a character device")):
        code, _, stderr = run_child(command, str(path), *extra, timeout=60)
        one_error((code, "", stderr), 1, what, "not a regular file")


def test_20_verify_of_a_model_and_merge_of_swapped_leaves(model: Path, pack: Path, tmp_path: Path) -> None:
    code, _, stderr = run_cli("verify", str(model))
    one_error((code, "", stderr), 1, "is a file, not a pack directory")
    assert f"-o {model}" not in stderr
    # Leaves swapped along with their checksums: every file matches the manifest, the whole does not.
    p = fresh(pack, tmp_path)
    a, b = p / mf.leaf_file(0, 0), p / mf.leaf_file(0, 1)
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)

    def swap(m):
        pa, pb = m["leaves"][0]["parts"], m["leaves"][1]["parts"]
        for x, y in zip(pa, pb):
            x["sha256"], y["sha256"] = y["sha256"], x["sha256"]

    edit_manifest(p, swap)
    one_error(run_cli("merge", str(p), "-o", str(tmp_path / "out.gguf")), 1,
              "merged bytes do not match the source's sha256", "not those of the source")
    assert "core.gguf" not in run_cli("merge", str(p), "-o", str(tmp_path / "out.gguf"))[2]


@pytest.mark.parametrize("args,needle", [
    (["--threads", "-1"], "--threads must be between 1 and"),
    (["--threads", "1000"], "--threads must be between 1 and"),
    (["--temp", "-1"], "--temp must be a finite number"),
    (["--temp", "nan"], "--temp must be a finite number"),
])
def test_21_option_ranges(pack: Path, args: list[str], needle: str) -> None:
    one_error(run_cli("run", str(pack), "-p", PROMPT, "-n", "2", *args), 2, needle)
    one_error(run_cli("chat", str(pack), *args), 2, needle)


def test_21_profile_n_and_replay_budget(pack: Path, trace: Path, tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("hello\n")
    one_error(run_cli("profile", str(pack), "--prompts", str(tmp_path / "prompts.txt"), "-n", "0"), 2,
              "--n-tokens must be at least 1")
    one_error(run_cli("replay", str(trace), "--budget", ","), 2, "at least one value")
    one_error(run_cli("replay", str(trace), "--policy", " , "), 2, "at least one value")


def test_21_run_prints_no_raw_control_characters() -> None:
    from smoe_gguf.template import printable

    assert printable("a\x1b[2Jb\x07c\td\n\x9b") == "a\ufffd[2Jb\ufffdc\td\n\ufffd"


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    code, _, stderr = run_cli("inspect", str(tmp_path / "none.gguf"))
    assert code == 1 and "Traceback" not in stderr
    code, _, stderr = run_cli("--debug", "inspect", str(tmp_path / "none.gguf"))
    assert code == 1 and "Traceback" in stderr and "no such file" in stderr
