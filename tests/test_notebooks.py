"""The analysis notebooks execute headless on the default model, and are committed without outputs."""

import nbformat
import pytest
from nbclient import NotebookClient

from test_run import ROOT

NOTEBOOKS = sorted((ROOT / "analysis" / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} == {"redundancy_and_plans.ipynb", "sweep_to_tables.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTATTN_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("FASTATTN_NOTEBOOK_STEPS", "10")
    monkeypatch.delenv("FASTATTN_SWEEP_DIR", raising=False)
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in book.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the figures were shown
