"""The README's quick start runs as written: its shell blocks, on a test model named as the README
names the user's model, and `make demo`'s script ends with the next step."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Use it with your model"


def quick_start_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return re.findall(r"```sh\n(.*?)```", text[start:end if end > 0 else None], re.S)


def test_the_quick_start_is_the_first_section() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first = re.search(r"^## .*$", text, re.M)
    assert first is not None and first.group(0) == SECTION
    assert text.index("make demo") < text.index(SECTION) and text.index("make test") < text.index(SECTION)
    assert len(quick_start_blocks()) >= 2


def test_the_quick_start_blocks_run(tiny_model, tmp_path: Path) -> None:
    blocks = quick_start_blocks()
    names = set(re.findall(r"models/([\w.-]+)\.gguf", "".join(blocks)))
    assert len(names) == 1, names  # one model, the user's
    (tmp_path / "models").mkdir()
    shutil.copy(tiny_model("qwen3moe", "f16"), tmp_path / "models" / f"{names.pop()}.gguf")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))  # `source .venv/bin/activate` works there too
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for block in blocks:
        r = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, env=env, input=b"hello\n",
                           capture_output=True, timeout=300)
        assert r.returncode == 0, f"{block}\n---\n{r.stderr.decode(errors='replace')}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_demo_ends_with_the_next_step(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DEMO_DIR": str(tmp_path / "demo")}
    r = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    tail = r.stdout.decode(errors="replace").strip().splitlines()[-3:]
    assert "random" in tail[0] and "smoe-gguf split models/" in tail[1] and "smoe-gguf chat models/" in tail[2]


def test_the_layout_section_names_every_module_and_only_real_ones() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Layout of the code")
    end = text.find("\n## ", start + 5)
    layout = text[start:end if end > 0 else None]
    pkg = ROOT / "smoe_gguf"
    modules = {str(p.relative_to(pkg)) for p in [*pkg.rglob("*.py"), *pkg.rglob("*.c")] if p.name != "__init__.py"}
    named = set(re.findall(r"`([\w/]+\.(?:py|c))`", layout))
    scripts = {p.name for p in (ROOT / "scripts").iterdir() if p.suffix in (".py", ".sh")}
    devtools = {m.removeprefix("devtools/") for m in modules if m.startswith("devtools/")}
    missing = {m for m in modules if m not in named and m.removeprefix("devtools/") not in named}
    assert not missing, f"modules the README's layout does not name: {sorted(missing)}"
    unknown = {n for n in named if n not in modules and n not in scripts and n not in devtools
               and not n.startswith("tests/")}
    assert not unknown, f"files the README's layout names that do not exist: {sorted(unknown)}"
