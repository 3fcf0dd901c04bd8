"""colab/quickstart.ipynb runs headless end to end (a few training steps) and draws its plots.

The kernel is this interpreter: a kernel spec written into a temporary directory starts
`sys.executable -m ipykernel_launcher`, so no installed or user-level Jupyter kernel is needed and
nothing is fetched. The notebook runs from `colab/`, which also checks that it finds `configs/`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "colab" / "quickstart.ipynb"
KERNEL_NAME = "engram_jax_test_python"


def _parameters_cell_index(nb: nbformat.NotebookNode) -> int:
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def _kernel_manager(spec_root: Path) -> KernelManager:
    """A manager whose only kernel spec runs ipykernel in this interpreter, headless."""
    spec_dir = spec_root / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "engram_jax test kernel",
        "language": "python",
        # Merged over the test's environment, which carries conftest's compilation-cache settings.
        "env": {"MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    specs = KernelSpecManager(kernel_dirs=[str(spec_root)])
    assert KERNEL_NAME in specs.find_kernel_specs()
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def test_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    parameters = nb.cells[_parameters_cell_index(nb)].source
    assert "NUM_STEPS = 300" in parameters


def test_notebook_runs_and_plots(tmp_path):
    assert "JAX_COMPILATION_CACHE_DIR" in os.environ  # set by conftest, inherited by the kernel
    nb = nbformat.read(NOTEBOOK, as_version=4)
    workdir = tmp_path / "workdir"
    # Injected right after the parameters cell, as papermill does: the notebook's own knobs.
    overrides = nbformat.v4.new_code_cell(
        f"NUM_STEPS = 4\nWORKDIR = {str(workdir)!r}\nBATCH_SIZE = 2\nSEQ_LEN = 32\n"
        "EVAL_BATCHES = 1\nSAMPLE_TOKENS = 4\n",
        metadata={"tags": ["injected-parameters"]},
    )
    nb.cells.insert(_parameters_cell_index(nb) + 1, overrides)

    client = NotebookClient(
        nb,
        km=_kernel_manager(tmp_path / "kernels"),
        timeout=600,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    # Raises CellExecutionError (with the failing cell and traceback) on any error.
    client.execute()

    images = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 2, f"expected the loss curve and the gate heatmap, got {len(images)}"
    text = "".join(
        output.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream"
    )
    assert "greedy:" in text and "top-p" in text
    assert "mean gate per layer" in text
    assert (workdir / "metrics.jsonl").is_file()
    assert not any(
        output.output_type == "error"
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
