"""notebooks/sae_features.ipynb and notebooks/training_curves.ipynb execute end to end against a small real
harvest store (random:tiny on 3 short ARC tasks) and a tiny TopK SAE trained on it through harvest.sae.train."""

import json
import shutil
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("matplotlib")
pytest.importorskip("pandas")

from harvest.sae import from_dict as sae_config  # noqa: E402
from harvest.sae import train  # noqa: E402
from helpers.runs import notebook_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("sae-notebooks")
    store = tmp / "run"
    notebook_store(store)
    out = tmp / "sae"
    summary = train(
        sae_config(
            {
                "data": {"store": str(store), "hook": HOOK, "eval_fraction": 0.1},
                "sae": {"d_sae": 128, "k": 8, "init_tokens": 256},
                "train": {
                    "batch_size": 64,
                    "steps": 300,
                    "warmup_steps": 30,
                    "log_every": 50,
                    "eval_every": 100,
                    "checkpoint_every": 300,
                    "dead_tokens": 5000,
                    "spliced_sequences": 0,  # the spliced model (engine compilations) would triple the test's time
                },
                "output": {"path": str(out)},
                "runtime": {"progress": False, "compile_cache": None, "mesh": {"data": 1}},
            }
        )
    )
    return {"store": store, "out": out, "summary": summary}


def execute(name: str, monkeypatch, **env) -> tuple[list, str]:
    """Run notebooks/<name> in a fresh kernel -> (its outputs, the text they print)."""
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for o in outputs)
    return outputs, text


def images(outputs: list) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs)


def test_sae_features_notebook(trained, monkeypatch):
    outputs, text = execute(
        "sae_features.ipynb", monkeypatch, HARVEST_STORE=trained["store"], HARVEST_SAE=trained["out"]
    )
    assert images(outputs) >= 3  # grid heat maps, density histograms, prompt vs answer scatter
    assert f"k {trained['summary']['k']}, hook {HOOK}" in text and "sample: 3 of 3 sequences" in text
    assert "LATENT = " in text and "mostly on answer tokens" in text
    # the random model never answers correctly, nor parses a grid: the comparison says so and is skipped
    assert "no sequence in the sample is correct" in text and "comparison skipped" in text


def test_training_curves_notebook(trained, monkeypatch):
    outputs, text = execute("training_curves.ipynb", monkeypatch, HARVEST_SAE=trained["out"])
    assert images(outputs) >= 4  # FVU, L0, dead latents, loss + lr
    assert "6 training windows, 3 evaluations, 0 spliced-model evaluations" in text
    absent = next(line for line in text.splitlines() if line.startswith("absent fields:"))
    assert absent == "absent fields: loss recovered (no spliced-model evaluation in metrics.jsonl)"
    assert "nothing to plot" in text


def test_training_curves_notebook_plots_loss_recovered(trained, monkeypatch, tmp_path):
    """A training with a spliced-model evaluation: its last metrics line, in docs/SAE.md's format (the demo's
    figures), appended to a copy of the tiny training's folder, so that the test needs no engine run."""
    out = Path(shutil.copytree(trained["out"], tmp_path / "sae", ignore=shutil.ignore_patterns("checkpoints")))
    part = lambda clean, spliced, zero: {
        "ce_clean": clean,
        "ce_spliced": spliced,
        "ce_zero_ablation": zero,
        "ce_increase": spliced - clean,
        "loss_recovered": (zero - spliced) / (zero - clean),
    }
    line = {
        "step": 300,
        "spliced": {
            "sequences": 1,
            "hook": HOOK,
            "prompt": part(11.5869, 11.5866, 11.9289),
            "answer": part(10.9407, 10.9923, 11.9802),
            "answers": {"answers": 1, "changed": 0, "share_changed": 0.0},
        },
    }
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    outputs, text = execute("training_curves.ipynb", monkeypatch, HARVEST_SAE=out / "sae")  # the sae/ folder works too
    assert images(outputs) >= 5  # ... and loss recovered
    assert "1 spliced-model evaluations" in text and "absent fields: none" in text
    assert "greedy answers whose grid changes when spliced: 0 of 1" in text
