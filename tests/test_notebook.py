"""notebooks/inspect_activations.ipynb executes end to end against a small real harvest store."""

from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("matplotlib")

from helpers.runs import notebook_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "inspect_activations.ipynb"


def test_notebook_executes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    notebook_store(out)
    monkeypatch.setenv("HARVEST_STORE", str(out))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # norm histograms, grid heatmaps, PCA, accuracy vs norm
    text = "".join(o.get("text", "") for o in outputs)
    assert "random:tiny" in text and "sequences: 3" in text
    assert (out / "stats" / "blocks.1.hook_resid_post.json").is_file()  # the statistics were cached
