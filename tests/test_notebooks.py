"""The notebooks run headless, top to bottom (a failing cell fails the test), and are committed clean.

They run in a kernel on this interpreter (``sys.executable``, so CI's venv) with this checkout's
``jax_nvfp4`` first on the path, matplotlib on Agg, from ``notebooks/`` as working directory.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys

import pytest

# The test extra installs these; elsewhere (the GPU machine) the notebooks are skipped.
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

NotebookClient = nbclient.NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "jax-nvfp4-tests"


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01-layout.ipynb", "02-memory.ipynb"]


@pytest.fixture
def kernel_manager(tmp_path, monkeypatch):
    spec = tmp_path / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jax-nvfp4 tests", "language": "python",
    }))
    # The kernel inherits this environment.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return AsyncKernelManager(kernel_name=KERNEL,
                              kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, kernel_manager):
    nb = nbformat.read(path, as_version=4)
    # A first cell (not saved) checks that the kernel is this interpreter and this checkout.
    check = nbformat.v4.new_code_cell(
        "import sys, jax_nvfp4\n"
        f"assert sys.executable == {sys.executable!r}, sys.executable\n"
        f"assert jax_nvfp4.__file__.startswith({str(ROOT)!r}), jax_nvfp4.__file__\n"
    )
    nb.cells.insert(0, check)
    client = NotebookClient(nb, km=kernel_manager, timeout=300,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, when a cell fails
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    assert path.stat().st_size < 64 << 10, f"{path.name}: {path.stat().st_size} bytes"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for k, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"{path.name}: cell {k} has outputs; clear them before committing"


def test_memory_notebook_plots_the_table_the_readme_quotes():
    nb = nbformat.read(ROOT / "notebooks" / "02-memory.ipynb", as_version=4)
    (table,) = re.findall(r'^TABLE = "([^"]+)"$', "\n".join(c.source for c in nb.cells), re.M)
    assert (ROOT / table).is_file(), table
    readme = (ROOT / "README.md").read_text()
    performance = readme[readme.index("\n## Performance"):]
    performance = performance[:performance.find("\n## ", 1)]
    # The table's run, by its name without the extension (.json for the notebook, .md to read).
    cited = set(re.findall(r"benchmarks/results/([\w.-]+?)\.(?:json|md)\b", performance))
    assert cited == {pathlib.Path(table).stem}, cited
