"""The example notebook runs from top to bottom (nbclient, in a fresh kernel): it cannot rot."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def test_the_quickstart_notebook_runs(tmp_path):
    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    assert "score" in outputs and "KL to the LM" in outputs and "mean VADER" in outputs
    assert any(o.get("output_type") == "display_data" for cell in notebook.cells for o in cell.get("outputs", []))
