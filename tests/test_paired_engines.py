"""scripts/paired_engines.py: configurations side by side in one process, prompts alternated."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("smoe_paired_engines", ROOT / "scripts" / "paired_engines.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_configurations_run_side_by_side_and_generate_the_same_tokens(pack_of, tmp_path: Path, capsys) -> None:
    script = _script()
    out = tmp_path / "pair.json"
    rc = script.main([str(pack_of("qwen3moe", "f32")), "--budget", "25%", "--configs",
                      "orchestrator-py+on,orchestrator+python-flights,reactive", "-n", "4", "--json-out", str(out)])
    assert rc == 0  # the same tokens in every configuration
    got = json.loads(out.read_text())
    assert list(got) == ["orchestrator-py+on", "orchestrator+python-flights", "reactive"]
    for r in got.values():
        assert r["decode_tps"] > 0 and len(r["generated"]) == 4  # one per prompt
        assert r["generated"] == got["reactive"]["generated"]
    printed = capsys.readouterr().out
    assert "orchestrator-py+on against orchestrator+python-flights:" in printed and "orchestrator-py+on against reactive:" in printed


def test_an_unknown_configuration_is_named() -> None:
    script = _script()
    with pytest.raises(SystemExit, match="unknown configuration 'eager'"):
        script.engine_options("eager", None)
    assert script.engine_options("orchestrator-py+on", None) == ({"profile": None, "speculate_native": False}, {"on"})
    assert script.engine_options("orchestrator+on+python-flights", None) == ({"profile": None},
                                                                              {"on", "python-flights"})
