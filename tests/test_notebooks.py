"""Every notebook runs end to end on the default model (CPU, small lengths), in memory: the
committed files, executed with their outputs and figures, are never written.

The kernels run torch on one thread (``OMP_NUM_THREADS=1`` unless set): on a small CPU shared with
other test processes, torch's OpenMP threads spin against each other, and one thread ran
01_quickstart in 61 s instead of 229 s (2 cores, load ~3.5).
"""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # the kernel inherits it
    committed = path.read_bytes()
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [output for cell in notebook.cells for output in cell.get("outputs", []) if output.get("output_type") == "error"]
    assert not errors
    assert path.read_bytes() == committed


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_is_committed_executed_and_small(path):
    """A reader on the web sees outputs and figures: every code cell was run, and no error is kept."""
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.get("execution_count") for cell in code), "commit the notebook executed"
    assert not [output for cell in code for output in cell.outputs if output.get("output_type") == "error"]
    assert path.stat().st_size < 1_000_000, "lower the figures' dpi in the notebook"
