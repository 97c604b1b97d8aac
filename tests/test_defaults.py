"""Every command with only its required arguments: the path a new user takes first."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from smoe_gguf import spin
from smoe_gguf.cli import app
from smoe_gguf.devtools import stock

from .cli_helpers import run_cli

COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:
    """A tiny model alone in a directory of its own (split writes beside it)."""
    path = tmp_path_factory.mktemp("defaults") / "tiny.gguf"
    shutil.copy(tiny_model("qwen2moe", "f16"), path)
    return path


@pytest.fixture(scope="module")
def pack(model: Path) -> Path:
    code, _, stderr = run_cli("split", str(model))
    assert code == 0, stderr
    return model.with_name("tiny.pack")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    code, stdout, _ = run_cli(command, "--help")
    assert code == 0 and "Usage" in stdout and "--help" in stdout


def test_split_writes_the_pack_beside_the_model(model: Path, pack: Path) -> None:
    assert (pack / "manifest.json").is_file() and (pack / "core.gguf").is_file()


def test_inspect_verify_and_merge_with_defaults(model: Path, pack: Path) -> None:
    code, stdout, _ = run_cli("inspect", str(model))
    assert code == 0 and "qwen2moe" in stdout and "smallest budget" in stdout
    code, stdout, _ = run_cli("verify", str(pack))
    assert code == 0 and "ok" in stdout
    code, stdout, stderr = run_cli("merge", str(pack))
    assert code == 0, stderr
    assert model.with_name("tiny.merged.gguf").read_bytes() == model.read_bytes()


def test_run_without_a_budget_uses_available_memory_and_matches_stock(model: Path, pack: Path) -> None:
    code, stdout, stderr = run_cli("run", str(pack), "-p", "hi")
    assert code == 0, stderr
    assert "budget:" in stderr and "available memory" in stderr
    ref = stock.greedy(model, "hi", n_tokens=64, plain_experts=True)
    text = b"".join(_pieces(model, ref.tokens)).decode("utf-8", "replace")
    head = stdout.split("\ufffd")[0]  # run shows control characters as U+FFFD
    assert len(head) >= 4 and text.startswith(head)


def test_run_json_default_budget_holds_every_leaf(pack: Path) -> None:
    code, stdout, stderr = run_cli("run", str(pack), "-p", "hi", "-n", "4", "--json")
    assert code == 0, stderr
    res = json.loads(stdout)
    assert res["budget_bytes"] > 0 and res["peak_resident_bytes"] <= res["budget_bytes"]
    assert res["generated_tokens"] >= 1


def test_chat_without_a_budget_reads_stdin(pack: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "smoe_gguf.cli", "chat", str(pack)], input=b"hello\n",
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.strip(), "chat printed no reply"


def test_replay_and_profile_with_defaults(pack: Path, tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    code, _, stderr = run_cli("run", str(pack), "-p", "hello there", "-n", "4", "--budget", "25%",
                              "--trace", str(trace))
    assert code == 0, stderr
    code, stdout, stderr = run_cli("replay", str(trace))
    assert code == 0 and "lru" in stdout, stderr
    code, _, stderr = run_cli("profile", str(pack))
    assert code == 2 and "--prompts" in stderr and len(stderr.strip().splitlines()) == 1
    code, stdout, _ = run_cli("profile", str(pack), "--show")
    assert code == 0


def _pieces(model: Path, tokens: list[int]) -> list[bytes]:
    import llama_cpp

    from smoe_gguf.llama_session import load_model, model_params, token_piece

    params = model_params()
    params.vocab_only = True
    m = load_model(model, params)
    try:
        vocab = llama_cpp.llama_model_get_vocab(m)
        return [token_piece(vocab, t) for t in tokens]
    finally:
        llama_cpp.llama_model_free(m)


def test_thread_knobs_default_and_yield_to_the_users() -> None:
    """numpy's BLAS single-threaded and libgomp's spin shortened, unless the user set them."""
    code = "import os, smoe_gguf; print(os.environ['OPENBLAS_NUM_THREADS'], os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", spin.PAGING]
    env["GOMP_SPINCOUNT"] = "7"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "7"]


def test_openmp_spin_follows_the_budget(pack_of) -> None:
    """Before llama.cpp loads, the run commands' spin: libgomp's own where the budget holds every
    leaf, the paging spin where it does not, the user's where set; none once llama.cpp is loaded
    (libgomp has read it) or for a model that cannot be read (the engine reports that)."""
    pack = pack_of("qwen2moe", "f16")
    code = ("import sys; from pathlib import Path; from smoe_gguf import spin; "
            "print(spin.for_budget(Path(sys.argv[1]), sys.argv[2]), spin.for_budget(Path(sys.argv[1]), None))")
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}

    def spins(budget: str, model: Path = pack, **extra: str) -> list[str]:
        return subprocess.run([sys.executable, "-c", code, str(model), budget], env={**env, **extra},
                              capture_output=True, text=True, check=True).stdout.split()

    assert spins("100%") == ["300000", "300000"]  # the default budget holds a tiny model
    assert spins("25%") == [spin.PAGING, spin.LIBGOMP_DEFAULT]
    assert spins("25%", GOMP_SPINCOUNT="7") == ["None", "None"]
    assert spins("25%", model=pack / "missing") == ["None", "None"]
    loaded = code.replace("from smoe_gguf import spin", "import llama_cpp; from smoe_gguf import spin")
    out = subprocess.run([sys.executable, "-c", loaded, str(pack), "100%"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "None"]


def test_a_session_that_pages_warns_where_libgomp_spins_its_own_default(pack_of) -> None:
    """llama.cpp loaded before smoe_gguf, no spin set by the user: a session that pages leaves
    warns (libgomp spins its default on the cores the reads need); one that holds every leaf, one
    whose spin smoe_gguf set first, or one with the user's spin does not."""
    pack = pack_of("qwen2moe", "f16")
    code = ("import sys\n{first}\nfrom smoe_gguf.engine import Engine\n"
            "with Engine(sys.argv[1], budget=sys.argv[2], n_ctx=64) as e:\n"
            "    print(any('spin libgomp' in w for w in e.warnings))")
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}

    def warned(first: str, budget: str, **extra: str) -> bool:
        out = subprocess.run([sys.executable, "-c", code.format(first=first), str(pack), budget], env={**env, **extra},
                             capture_output=True, text=True, check=True).stdout
        return out.split()[-1] == "True"

    probe = "import llama_cpp; from smoe_gguf import spin; print(spin.libgomp_loaded())"
    gomp = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "True"
    assert warned("import llama_cpp", "25%") == gomp  # no libgomp (another OpenMP): nothing to warn of
    assert not warned("import llama_cpp", "100%")
    assert not warned("import smoe_gguf, llama_cpp", "25%")
    assert not warned("import llama_cpp", "25%", GOMP_SPINCOUNT="7")


def test_decode_keeps_a_core_free_while_leaves_are_paged(pack_of) -> None:
    """Default compute threads: every usable core (at most 8) for prompts, and for decode where
    the budget holds every leaf; one core less for decode while leaves are paged (readers and
    orchestration take it). ``n_threads`` sets both; llama.cpp's context gets what the engine says."""
    import llama_cpp

    from smoe_gguf.engine import Engine

    pack = pack_of("qwen2moe", "f16")
    cores = min(8, len(os.sched_getaffinity(0)))

    def threads(budget: str, **kw: int) -> tuple[bool, int, int]:
        with Engine(pack, budget=budget, n_ctx=64, **kw) as e:
            assert (llama_cpp.llama_n_threads(e._ctx), llama_cpp.llama_n_threads_batch(e._ctx)) == \
                (e.n_threads, e.n_threads_batch)
            return e.paging, e.n_threads, e.n_threads_batch

    assert threads("25%") == (True, max(1, cores - 1), cores)
    assert threads("100%") == (False, cores, cores)
    assert threads("25%", n_threads=1) == (True, 1, 1)
