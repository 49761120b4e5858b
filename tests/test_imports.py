"""Every module imports on its own, and no two of fdino's modules import each other, directly or
around a loop, counting imports inside functions too (eval/loading.py and export/official.py once
did, which is how two loaders for one job grew)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> package name (kernels/ installs as fdino.kernels; see pyproject.toml).
PACKAGES = {ROOT / "fdino": "fdino", ROOT / "kernels": "fdino.kernels"}


def module_files() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = module_files()


def imported_modules(name: str, path: Path) -> set[str]:
    """fdino modules that ``name`` imports anywhere in its file (explicit imports only: the implicit
    import of parent packages is how Python works, not a dependency the code chose)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in out if m in MODULES and m != name}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.append(w)
            on_stack.discard(v)
            if component:
                cycles.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    graph = {name: imported_modules(name, path) for name, path in MODULES.items()}
    assert "fdino.checkpoint" in graph["fdino.weights.load"]  # the walk sees real edges
    assert import_cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


# modules that need an optional extra at import time
OPTIONAL = {"fdino.serve.app": "fastapi", "fdino.app.ui": "gradio", "fdino.app.cli": "gradio"}


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not m.endswith(".__main__")))  # __main__ runs the CLI
def test_every_module_imports(name):
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name])
    importlib.import_module(name)
