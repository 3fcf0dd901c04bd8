"""colab/quickstart.ipynb runs headless end to end (a few training steps) and draws its plots.

The kernel is this interpreter: a kernel spec written into a temporary directory starts
`sys.executable -m ipykernel_launcher`, so no installed or user-level Jupyter kernel is needed and
nothing is fetched. The notebook runs from `colab/`: its install cell finds the checkout one level
up, sees that the importable engram_jax comes from it and installs nothing (the test checks the
commands it would run); the training run draws the workdir's plots, which the notebook shows.
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
    # Right after the install cell: the local-checkout path it took, and the commands it would run.
    install_index = next(i for i, c in enumerate(nb.cells) if "def install_commands" in c.source)
    install_check = nbformat.v4.new_code_cell(
        f"assert find_checkout() == Path({str(REPO)!r}), find_checkout()\n"
        f"assert source == {str(REPO)!r} and installed_from(source)\n"
        f"pip = [sys.executable, '-m', 'pip', 'install', '-q']\n"
        f"assert install_commands(source, True) == [[*pip, '--no-deps', source]]\n"
        f"assert install_commands(source, False) == [[*pip, source]]\n"
        "assert 'jax' not in ' '.join(missing_requirements())\n"
        "assert any(pin.startswith('jax==') for pin in pinned_jax())\n",
        metadata={"tags": ["injected-check"]},
    )
    nb.cells.insert(install_index + 1, install_check)

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
    # loss, engram_gate, hc_amax_gain and moe_load from <workdir>/plots/, then the gate heatmap.
    assert len(images) == 5, (
        f"expected the four workdir plots and the gate heatmap, got {len(images)}"
    )
    text = "".join(
        output.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream"
    )
    assert f"already installed from {REPO}" in text
    assert "greedy:" in text and "top-p" in text
    assert "mean gate per layer" in text
    assert (workdir / "metrics.jsonl").is_file()
    assert len(list((workdir / "plots").glob("*.png"))) == 4
    assert not any(
        output.output_type == "error"
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
