"""The package's module import graph has no cycle, counting imports inside functions too: a
module never needs another that (directly or through others) needs it back."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

PACKAGE = "engram_jax"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the package by dotted name (a package by its `__init__`)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its body (functions included).

    `from a import b` names module `a.b` when that is a module, else module `a`; relative imports
    resolve against `name`'s package. The package root (`engram_jax/__init__`, lazy exports only)
    is not an edge: every submodule's import runs it.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t if t in modules else base for t in targets]
        else:
            continue
        for target in targets:
            # `import a.b.c` needs module a.b.c; the longest prefix that is one of ours.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != PACKAGE and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_inside_functions_and_from_forms_count(tmp_path):
    modules = _modules()
    path = tmp_path / "probe.py"
    path.write_text(
        "import engram_jax.tables.row_optim\n"
        "from engram_jax import sharding as sharding_lib\n"
        "from engram_jax.model import Transformer\n"
        "from . import storage\n"
        "def late():\n"
        "    from engram_jax.train import train_and_evaluate\n"
    )
    assert _imports("engram_jax.probe", path, modules) == {
        "engram_jax.tables.row_optim",
        "engram_jax.sharding",
        "engram_jax.model",
        "engram_jax.storage",
        "engram_jax.train",
    }


def test_no_import_cycle_in_the_package():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("name", sorted(_modules()))
def test_every_module_imports(name):
    importlib.import_module(name)
