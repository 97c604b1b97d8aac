"""The package's import graph: no cycles, and the runtime never imports the development tools."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "smoe_gguf"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every smoe_gguf module ``path`` imports, at any depth of its code (lazy imports count)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("smoe_gguf")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("smoe_gguf"):
                continue
            for a in node.names:  # `from . import x` imports the module x when there is one
                sub = f"{mod}.{a.name}"
                found.add(sub if sub in MODULES else mod)
    return {m for m in found if m in MODULES and m != name}


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}
GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(GRAPH[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(GRAPH):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_the_graph_is_read() -> None:
    assert "smoe_gguf.engine" in GRAPH and "smoe_gguf.residency" in GRAPH["smoe_gguf.engine"]
    assert "smoe_gguf.llama_session" in GRAPH["smoe_gguf.devtools.stock"]


def test_no_import_cycles() -> None:
    assert _cycle() is None, " -> ".join(_cycle() or [])


def test_the_runtime_never_imports_the_devtools() -> None:
    bad = {n: sorted(m for m in deps if m.startswith("smoe_gguf.devtools"))
           for n, deps in GRAPH.items() if not n.startswith("smoe_gguf.devtools")}
    assert {n: d for n, d in bad.items() if d} == {}
