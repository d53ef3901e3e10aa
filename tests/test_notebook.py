"""notebooks/inspect_activations.ipynb executes end to end against a small real harvest store."""

from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("matplotlib")

from harvest.cli.config import from_dict  # noqa: E402
from harvest.run import run as run_harvest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "inspect_activations.ipynb"
SHORT_TASKS = ["66e6c45b", "00576224", "be03b35f"]  # ARC-AGI-1 evaluation, 112-220 prompt tokens


def test_notebook_executes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_harvest(
        from_dict(
            {
                "model": {"path": "random:tiny", "dtype": "float32"},
                "data": {
                    "source": "arc-agi-1",
                    "split": "evaluation",
                    "tasks": SHORT_TASKS,
                    "limit": 3,
                    "shuffle_seed": 1,
                },
                "generation": {"max_new_tokens": 8, "fixed_length": True},
                "capture": {
                    "hooks": ["blocks.1.hook_resid_post", "blocks.2.mlp.hook_post"],
                    "phases": ["prefill", "decode"],
                    "dtype": "bfloat16",
                    "shard_mb": 1,
                },
                "runtime": {"batch_size": 3, "progress": False, "compile_cache": None},
                "output": {"path": str(out)},
            }
        )
    )
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
