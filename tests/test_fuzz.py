"""Seeded fuzz of hostile input (issue 18): random mutations of a small GGUF, of a pack manifest
and of a trace, through inspect, split, verify, merge, replay and run. Each case runs in a child
process (tests/fuzz_driver.py) under a time limit: no traceback, no hang, no abort; every
failure is one line; a run either refuses or gives stock llama.cpp's tokens when the mutation
left the model's bytes as they were; a merge that succeeds writes the source, byte for byte;
no input file changes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from smoe_gguf.devtools import stock
from smoe_gguf.gguf_layout import T_ARRAY, T_INT32, T_STRING, T_UINT32, encode_kv, encode_string, read_layout
from smoe_gguf.pack import manifest as mf

from .cli_helpers import run_cli
from .hostile_helpers import ROOT, rewrite_gguf, snapshot

T_FLOAT32, T_UINT64 = 6, 10  # GGUF value types
SEED = int(os.environ.get("SMOE_FUZZ_SEED", "18"))  # another seed explores other mutations
N_GGUF, N_MANIFEST, N_TRACE = 80, 80, 60
PROMPT = "The quick brown fox"
N_TOKENS = 3
RUN = ["-p", PROMPT, "-n", str(N_TOKENS), "--budget", "100%", "--no-profile", "--threads", "1", "--json"]
CASE_SECONDS = 60  # one case (a few commands on an 8 MB model) takes well under a second

HOSTILE_INTS = [0, 1, 2, 3, 4, 15, 16, 17, 31, 32, 33, 511, 512, 513, 1000, 4096, 2**31 - 1, 2**32 - 1]
HOSTILE_U64 = [0, 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
KEYS = ["general.alignment", "split.count", "qwen3moe.block_count", "qwen3moe.expert_count",
        "qwen3moe.expert_used_count", "qwen3moe.context_length", "qwen3moe.expert_shared_count",
        "general.architecture"]


# ---------------------------------------------------------------------------- mutations


def _hostile_kv(rng: random.Random, key: str) -> bytes:
    kind = rng.randrange(7)
    if kind == 0:
        return encode_kv(key, T_STRING, rng.choice(["", "16", "x" * 40, "qwen3moe", "../../etc"]))
    if kind == 1:
        return encode_kv(key, T_INT32, rng.choice([-1, -32, -(2**31), 0, 4]))
    if kind == 2:
        return encode_kv(key, T_FLOAT32, rng.choice([0.0, 4.0, float("nan"), -1.0]))
    if kind == 3:
        return encode_kv(key, T_UINT64, rng.choice(HOSTILE_U64))
    if kind == 4:  # an array of uint32
        n = rng.choice([0, 1, 4])
        return encode_string(key) + struct.pack("<IIQ", T_ARRAY, T_UINT32, n) + bytes(4 * n)
    return encode_kv(key, T_UINT32, rng.choice(HOSTILE_INTS))


def _info_fields(data: bytes, start: int, n_tensors: int) -> list[tuple[int, int]]:
    """(offset, width) of every numeric field of the tensor-info block."""
    fields, pos = [], start
    for _ in range(n_tensors):
        (n,) = struct.unpack_from("<Q", data, pos)
        fields.append((pos, 8))
        pos += 8 + n
        (n_dims,) = struct.unpack_from("<I", data, pos)
        fields.append((pos, 4))
        pos += 4
        fields += [(pos + 8 * i, 8) for i in range(n_dims)]
        pos += 8 * n_dims
        fields += [(pos, 4), (pos + 4, 8)]
        pos += 12
    return fields


def mutate_gguf(rng: random.Random, src: Path, dst: Path) -> str:
    """Write a mutation of ``src`` to ``dst``; what was done."""
    data = bytearray(src.read_bytes())
    layout = read_layout(src)
    kind = rng.randrange(8)
    if kind == 0:  # flip bytes in the header
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(layout.data_offset)] ^= 1 << rng.randrange(8)
        what = "header byte flips"
    elif kind == 1:  # a numeric field of the tensor-info block
        pos, width = rng.choice(_info_fields(bytes(data), layout.kv_end, len(layout.tensors)))
        value = rng.choice(HOSTILE_U64) % (1 << (8 * width))
        data[pos:pos + width] = value.to_bytes(width, "little")
        what = f"tensor-info field at {pos} = {value}"
    elif kind == 2:  # the fixed header: version, counts
        pos, width = rng.choice([(4, 4), (8, 8), (16, 8)])
        value = rng.choice(HOSTILE_U64) % (1 << (8 * width))
        data[pos:pos + width] = value.to_bytes(width, "little")
        what = f"fixed header field at {pos} = {value}"
    elif kind == 3:  # truncated
        cut = rng.choice([rng.randrange(layout.data_offset), rng.randrange(len(data))])
        del data[cut:]
        what = f"truncated at {cut}"
    elif kind in (4, 5):  # a key the MoE view or llama.cpp depends on, with a hostile value or type
        key = rng.choice(KEYS)
        rewrite_gguf(src, dst, kvs={key: None if rng.random() < 0.15 else _hostile_kv(rng, key)})
        return f"key {key} rewritten"
    elif kind == 6:  # expert data changed: the header is sound, the output may differ
        at = rng.choice([t for t in layout.tensors if "exps" in t.name])
        data[at.offset + rng.randrange(at.nbytes)] ^= 0xFF
        what = f"a byte of {at.name}"
    else:  # a key rewritten with its own value: the same bytes
        key = rng.choice(["qwen3moe.block_count", "qwen3moe.expert_count", "general.architecture"])
        rewrite_gguf(src, dst, kvs={key: layout.kvs[key].raw})
        return f"key {key} rewritten unchanged"
    dst.write_bytes(data)
    return what


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        node = node[k]
    return node


HOSTILE_JSON: list[Any] = [0, -1, 1, 2, 15, 16, 17, 4096, 2**31, 2**62, 2**64, 1.5, -0.0, "x", "", None, [], {},
                           True, "../x", "/dev/zero", "/etc/passwd", "core.gguf", "leaves/000/0000.leaf", "0" * 64]


def mutate_json(rng: random.Random, doc: Any, *, shallow_paths: bool = False) -> tuple[Any, str]:
    """One random change to a JSON document: a value replaced (by a hostile one or another node's),
    a key deleted, a list item dropped, repeated or swapped."""
    doc = json.loads(json.dumps(doc))
    paths = [p for p in _paths(doc) if p]
    path = rng.choice(paths)
    parent, key = _get(doc, path[:-1]), path[-1]
    op = rng.randrange(6)
    if op == 0 and isinstance(parent, dict):
        del parent[key]
        return doc, f"deleted {path}"
    if op == 1 and isinstance(parent, list):
        parent.pop(key)
        return doc, f"dropped {path}"
    if op == 2 and isinstance(parent, list):
        parent.insert(key, json.loads(json.dumps(parent[key])))
        return doc, f"repeated {path}"
    if op == 3 and isinstance(parent, list) and len(parent) > 1:
        j = rng.randrange(len(parent))
        parent[key], parent[j] = parent[j], parent[key]
        return doc, f"swapped {path} with {j}"
    if op == 4:
        other = _get(doc, rng.choice(paths))
        parent[key] = json.loads(json.dumps(other))
        return doc, f"{path} = another node"
    value = rng.choice(HOSTILE_JSON)
    old = parent[key]
    if isinstance(old, int) and not isinstance(old, bool) and rng.random() < 0.5:
        value = old + rng.choice([-1, 1, 4096, -4096, 2**32])
    parent[key] = value
    return doc, f"{path} = {value!r}"[:200]


def mutate_trace(rng: random.Random, lines: list[Any]) -> tuple[str, str]:
    """A mutated trace's text, and what was done."""
    lines = json.loads(json.dumps(lines))
    kind = rng.randrange(6)
    if kind <= 2:  # one value of the header (more often) or of a gate line
        i = 0 if kind == 0 or len(lines) == 1 else rng.randrange(1, len(lines))
        lines[i], what = mutate_json(rng, {"x": lines[i]})
        lines[i] = lines[i].get("x") if isinstance(lines[i], dict) else lines[i]
        what = f"line {i + 1}: {what}"
    elif kind == 3:
        i = rng.randrange(len(lines))
        lines.insert(i, lines[rng.randrange(len(lines))])
        what = f"line repeated at {i + 1}"
    elif kind == 4:
        i = rng.randrange(len(lines))
        del lines[i]
        what = f"line {i + 1} deleted"
    else:
        text = "\n".join(json.dumps(x) for x in lines) + "\n"
        cut = rng.randrange(len(text))
        garbage = rng.choice(["", "\x00\xff", "[" * 5000, '{"pos":', "\n\n"])
        return text[:cut] + garbage, f"cut at {cut} + {garbage[:10]!r}"
    return "\n".join(json.dumps(x) for x in lines) + "\n", what


# ---------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fuzz")
    model = root / "model.gguf"
    shutil.copyfile(tiny_model("qwen3moe", "f32"), model)
    pack = root / "pack"
    code, _, stderr = run_cli("split", "-q", str(model), "-o", str(pack))
    assert code == 0, stderr
    trace = root / "trace.jsonl"
    code, _, stderr = run_cli("run", str(pack), *RUN[:-1], "--budget", "25%", "--trace", str(trace))
    assert code == 0, stderr
    tokens = stock.greedy(model, PROMPT, n_tokens=N_TOKENS, n_threads=1).tokens
    return {"root": root, "model": model, "pack": pack, "trace": trace, "tokens": tokens}


def _link_pack(pack: Path, dst: Path, manifest_text: str) -> Path:
    """A pack of hard links to ``pack``'s files (never written) with another manifest."""
    for f in pack.rglob("*"):
        target = dst / f.relative_to(pack)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif f.name != mf.MANIFEST:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, target)
    (dst / mf.MANIFEST).write_text(manifest_text)
    return dst


def _cases(corpus: dict[str, Any], work: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    rng = random.Random(SEED)
    model, pack, trace = corpus["model"], corpus["pack"], corpus["trace"]
    model_bytes = model.read_bytes()
    cases, info = [], {}
    for i in range(N_GGUF):
        g = work / f"g{i}.gguf"
        what = mutate_gguf(rng, model, g)
        cid = f"gguf-{i}"
        cases.append({"id": cid, "steps": [
            {"args": ["inspect", "--json", str(g)]},
            {"args": ["split", "-q", str(g), "-o", str(work / f"g{i}.pack")]},
            {"args": ["verify", str(work / f"g{i}.pack")], "if_ok": 1},
            {"args": ["run", str(g), *RUN], "if_ok": 0},
        ]})
        info[cid] = {"what": what, "same_model": g.read_bytes() == model_bytes, "run_steps": [3]}
    manifest = json.loads((pack / mf.MANIFEST).read_text())
    for i in range(N_MANIFEST):
        doc, what = mutate_json(rng, manifest)
        p = _link_pack(pack, work / f"m{i}", json.dumps(doc))
        cid = f"manifest-{i}"
        cases.append({"id": cid, "steps": [
            {"args": ["verify", str(p)]},
            {"args": ["run", str(p), *RUN]},
            {"args": ["merge", str(p), "-o", str(work / f"m{i}.gguf")]},
        ]})
        info[cid] = {"what": what, "same_model": True, "run_steps": [1], "merge_step": 2,
                     "merged": work / f"m{i}.gguf"}
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    for i in range(N_TRACE):
        text, what = mutate_trace(rng, lines)
        t = work / f"t{i}.jsonl"
        t.write_text(text, encoding="utf-8", errors="surrogateescape")
        cid = f"trace-{i}"
        cases.append({"id": cid, "steps": [{"args": ["replay", str(t), "--policy", "lru,lfru",
                                                     "--budget", "10%,50%", "--json"]}]})
        info[cid] = {"what": what, "run_steps": []}
    return cases, info


def _run_driver(cases: list[dict[str, Any]], work: Path, name: str) -> dict[str, list[Any]]:
    job = work / f"{name}.json"
    job.write_text(json.dumps(cases))
    timeout = CASE_SECONDS * 3 + 2 * len(cases)
    try:
        proc = subprocess.run([sys.executable, "-m", "tests.fuzz_driver", str(job), str(CASE_SECONDS)],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout, errors="replace")
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = "timed out", None
    done, started = {}, None
    for line in out.splitlines():
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        if "start" in rec:
            started = rec["start"]
        else:
            done[rec["id"]] = rec["results"]
            started = None
    assert started is None and rc == 0, f"fuzz case {started} hung or crashed (exit {rc}): {err[-3000:]}"
    return done


def _check(cid: str, results: list[Any], info: dict[str, Any], stock_tokens: list[int], source_sha: str) -> None:
    what = info["what"]
    for i, res in enumerate(results):
        if res is None:
            continue
        code, stdout, stderr = res
        assert "Traceback" not in stderr and "internal error" not in stderr, (cid, what, stderr)
        assert code in (0, 1, 2), (cid, what, code, stderr)
        if code != 0:
            errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
            assert len(errors) == 1, (cid, what, stderr)
        if code == 0 and i in info["run_steps"] and info["same_model"]:
            tokens = json.loads(stdout)["tokens"]
            assert tokens == stock_tokens, (cid, what, "a run gave other tokens than stock llama.cpp")
        if code == 0 and i == info.get("merge_step"):
            merged = info["merged"].read_bytes()
            assert hashlib.sha256(merged).hexdigest() == source_sha, (cid, what, "merge wrote another model")


def test_fuzz_hostile_inputs(corpus: dict[str, Any], tmp_path: Path) -> None:
    inputs = [corpus["model"], corpus["pack"], corpus["trace"]]
    before = snapshot(*inputs)
    cases, info = _cases(corpus, tmp_path)
    assert len(cases) >= 200
    source_sha = hashlib.sha256(corpus["model"].read_bytes()).hexdigest()
    refused = ran = 0
    for kind in ("gguf", "manifest", "trace"):
        group = [c for c in cases if c["id"].startswith(kind)]
        done = _run_driver(group, tmp_path, kind)
        assert sorted(done) == sorted(c["id"] for c in group)
        for cid, results in done.items():
            _check(cid, results, info[cid], corpus["tokens"], source_sha)
            refused += any(r is not None and r[0] != 0 for r in results)
            ran += any(r is not None and r[0] == 0 and i in info[cid]["run_steps"] for i, r in enumerate(results))
    assert refused > 100 and ran > 10  # the mutations reach both the refusals and llama.cpp
    assert snapshot(*inputs) == before
