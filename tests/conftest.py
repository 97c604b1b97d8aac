"""Shared fixtures."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from smoe_gguf.devtools.testmodels import build_test_model
from smoe_gguf.pack.split import split

# The tests of Ctrl-C interrupt this process and the commands it starts. A suite started in the
# background by a shell without job control (`make test &`) inherits SIGINT ignored, and so would
# every command it starts. Python's own handler replaces the ignore: a command started from here
# then begins with SIGINT's default (exec keeps an ignore, not a handler).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """``tiny_model(arch, dtype) -> Path``: a tiny test model (seed 0), built once per session."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[tuple[str, str], Path] = {}

    def get(arch: str, dtype: str) -> Path:
        if (arch, dtype) not in built:
            built[(arch, dtype)] = build_test_model(root / f"{arch}-{dtype}.gguf", arch, "tiny", dtype)
        return built[(arch, dtype)]

    return get


@pytest.fixture(scope="session")
def pack_of(tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[[str, str], Path]) -> Callable[[str, str], Path]:
    """``pack_of(arch, dtype) -> Path``: the pack of ``tiny_model(arch, dtype)``, split once per session."""
    root = tmp_path_factory.mktemp("engine-packs")
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str, dtype: str) -> Path:
        if (arch, dtype) not in cache:
            cache[(arch, dtype)] = root / f"{arch}-{dtype}.pack"
            split(tiny_model(arch, dtype), cache[(arch, dtype)])
        return cache[(arch, dtype)]

    return get


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Tree-map profiles (and anything else under the user's cache) go to a directory of this
    session, never to the real ~/.cache; child processes inherit it."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old
