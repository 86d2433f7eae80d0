"""The module tree in README.md's ``## Design`` names exactly the package's .py files.

The tree is the first code block of that section: one entry a line, two spaces a level,
``name/`` a directory (it names the package's ``__init__.py``), ``name.py`` a module,
then a description; a line whose first word is neither continues the description above.
A directory listed with no entries under it stands for whatever files it holds (it must
exist). The helpers are checked on planted extra, missing and misplaced names below.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "jax_nvfp4"


def design_tree(readme: str) -> str:
    """The first code block of the ``## Design`` section."""
    section = readme[readme.index("\n## Design\n"):]
    section = section[:section.find("\n## ", 1)]
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", section, re.M | re.S)
    assert blocks, "no code block under ## Design"
    return blocks[0]


def parse_tree(block: str) -> tuple[set[str], set[str]]:
    """(files, directories) the tree names, as paths from the repository root
    (directories ending in ``/``). Raises ValueError on a line that is not a tree entry."""
    files: set[str] = set()
    dirs: set[str] = set()
    stack: list[str] = []
    name_end = None  # where the last entry's name ends (a continuation is indented past it)
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        token = line.split()[0]
        if not token.endswith((".py", "/")):
            if name_end is None or indent <= name_end:
                raise ValueError(f"not a tree entry: {line!r}")
            continue
        depth, odd = divmod(indent, 2)
        if odd or depth > len(stack) or (depth == 0) != (token == f"{PACKAGE}/") \
                or (depth == 0 and stack):
            raise ValueError(f"misplaced tree entry: {line!r}")
        del stack[depth:]
        path = "".join(stack) + token
        if path in files or path in dirs:
            raise ValueError(f"named twice: {path}")
        if token.endswith("/"):
            dirs.add(path)
            stack.append(token)
        else:
            files.add(path)
        name_end = indent + len(token)
    return files, dirs


def differences(block: str, real: set[str]) -> tuple[set[str], set[str]]:
    """(real files the tree does not name, names in the tree that are not real files or
    directories), ``real`` being .py paths from the repository root."""
    files, dirs = parse_tree(block)
    named = files | {d + "__init__.py" for d in dirs}
    real_dirs = {p[:i + 1] for p in real for i, c in enumerate(p) if c == "/"}
    open_dirs = {d for d in dirs if not any(p != d and p.startswith(d) for p in files | dirs)}
    covered = named | {p for p in real if p.startswith(tuple(open_dirs))}
    missing = real - covered
    extra = (named - real - {d + "__init__.py" for d in open_dirs}) | (dirs - real_dirs)
    return missing, extra


def real_files() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / PACKAGE).rglob("*.py")}


@pytest.fixture(scope="module")
def tree() -> str:
    return design_tree((ROOT / "README.md").read_text())


def test_the_readme_tree_names_every_module_and_nothing_else(tree):
    missing, extra = differences(tree, real_files())
    assert not missing, f"in jax_nvfp4/ but not in README.md's Design tree: {sorted(missing)}"
    assert not extra, f"in README.md's Design tree but not in jax_nvfp4/: {sorted(extra)}"


def _without(tree: str, entry: str) -> str:
    lines = tree.splitlines(keepends=True)
    (k,) = [k for k, line in enumerate(lines) if line.split()[:1] == [entry]]
    return "".join(lines[:k] + lines[k + 1:])


def test_a_planted_extra_name_is_caught(tree):
    planted = tree.replace("\n", "\n  ghost.py           not a module\n", 1)
    assert differences(planted, real_files()) == (set(), {"jax_nvfp4/ghost.py"})
    assert differences(tree, real_files() | {"jax_nvfp4/new.py"}) == ({"jax_nvfp4/new.py"}, set())


def test_a_missing_name_is_caught(tree):
    assert differences(_without(tree, "cli.py"), real_files()) == ({"jax_nvfp4/cli.py"}, set())


def test_a_file_under_the_wrong_directory_is_caught():
    block = ("jax_nvfp4/\n  __init__.py\n  layout/\n    select.py   the decision\n"
             "  backends/\n    xla.py      transforms\n")
    real = {"jax_nvfp4/__init__.py", "jax_nvfp4/layout/__init__.py",
            "jax_nvfp4/backends/__init__.py", "jax_nvfp4/backends/xla.py",
            "jax_nvfp4/backends/select.py"}
    assert differences(block, real) == ({"jax_nvfp4/backends/select.py"},
                                        {"jax_nvfp4/layout/select.py"})


def test_a_directory_without_entries_must_exist():
    real = {"jax_nvfp4/__init__.py", "jax_nvfp4/kernels/__init__.py", "jax_nvfp4/kernels/_moe.py"}
    assert differences("jax_nvfp4/\n  __init__.py\n  kernels/   FFI calls\n", real) == (
        set(), set())
    assert differences("jax_nvfp4/\n  __init__.py\n  kernel/   FFI calls\n", real) == (
        {"jax_nvfp4/kernels/__init__.py", "jax_nvfp4/kernels/_moe.py"}, {"jax_nvfp4/kernel/"})


@pytest.mark.parametrize("block", [
    "jax_nvfp4/\n  notes.txt      not a module\n",
    "jax_nvfp4/\n   cli.py        odd indent\n",
    "jax_nvfp4/\n      cli.py     a level skipped\n",
    "jax_nvfp4/\n  cli.py\n  cli.py\n",
    "other/\n  cli.py\n",
])
def test_lines_that_are_not_tree_entries_are_refused(block):
    with pytest.raises(ValueError):
        parse_tree(block)
