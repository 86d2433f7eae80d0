"""The package's import graph: no cycle, no module reaching up into a package's ``__init__``.

Every module under jax_nvfp4/ is parsed (no import runs), and every import in it,
function-level ones included, becomes an edge to the module it names; so does a string
that names a module (the CLI imports its commands by name). A lazy import counts: one
that only dodges a cycle is still the cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "jax_nvfp4"
# Entry points may use the public API (the package root) like any user.
ENTRY_POINTS = {"jax_nvfp4.__main__", "jax_nvfp4.cli"}


def _modules(top: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(top.rglob("*.py")):
        parts = path.relative_to(top.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _target(name: str, modules) -> str:
    """The module an import of ``name`` loads last (a name in a package: the package)."""
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def import_graph(top: Path) -> dict[str, set[str]]:
    """``module -> modules it imports`` within the package at ``top``."""
    modules = _modules(top)
    pkg = top.name
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
                # "from X import y": the submodule X.y where there is one, else X itself
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                         for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value in modules and node.value != pkg:
                    names = [node.value]
            for n in names:
                if n == pkg or n.startswith(pkg + "."):
                    graph[name].add(_target(n, modules))
        graph[name].discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of its modules (first one repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n):
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        path.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """``(module, package)`` where a module imports a package (its ``__init__``) that
    contains it: the package root's public API, or its own subpackage's ``__init__``."""
    return sorted((n, m) for n, targets in graph.items() for m in targets
                  if n.startswith(m + ".") and n not in ENTRY_POINTS)


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph(ROOT / PACKAGE)) is None


def test_no_module_imports_a_package_that_contains_it():
    assert upward_imports(import_graph(ROOT / PACKAGE)) == []


def test_subpackage_inits_import_nothing_of_the_package():
    # What a subpackage holds is read from its modules; its __init__ is only a docstring.
    graph = import_graph(ROOT / PACKAGE)
    assert {n: sorted(t) for n, t in graph.items()
            if n != PACKAGE and (ROOT / Path(*n.split("."))).is_dir() and t
            and n != "jax_nvfp4.kernels"} == {}


def _write(top: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = top / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return top


def test_a_planted_cycle_and_upward_import_are_found(tmp_path):
    top = _write(tmp_path / "pkg", {
        "__init__.py": "from .a import f\n",
        "a.py": "from .sub import b\n\ndef f():\n    pass\n",
        "sub/__init__.py": "",
        # function-level, and spelled as a name in the parent package
        "sub/b.py": "def g():\n    from .. import a\n",
        "sub/c.py": "from .. import f\n",
        "cli.py": "COMMANDS = {'x': 'pkg.sub.c'}\n",
    })
    graph = import_graph(top)
    assert graph["pkg.cli"] == {"pkg.sub.c"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    assert upward_imports(graph) == [("pkg.sub.c", "pkg")]
    top.joinpath("sub/b.py").write_text("def g():\n    pass\n")
    assert find_cycle(import_graph(top)) is None


@pytest.mark.parametrize("text", ["import pkg.sub\n", "from . import x\n", "from .. import a\n"])
def test_a_subpackage_init_or_root_import_counts_as_upward(tmp_path, text):
    top = _write(tmp_path / "pkg", {"__init__.py": "", "a.py": "", "sub/__init__.py": "x = 1\n",
                                    "sub/m.py": text})
    assert upward_imports(import_graph(top)) == (
        [] if text == "from .. import a\n" else [("pkg.sub.m", "pkg.sub")])
