"""The spliced model on a real harvest run: the engine with the SAE substituted at its hook."""

import jax.numpy as jnp
import numpy as np
import pytest

from harvest.cli.config import from_dict as run_config
from harvest.data import open_store
from harvest.run import run as run_harvest

HOOK = "blocks.2.hook_resid_mid"


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    out = tmp_path_factory.mktemp("spliced") / "run"
    run_harvest(
        run_config(
            {
                "model": {"path": "random:tiny", "dtype": "float32"},
                "data": {"tasks": ["66e6c45b", "00576224", "be03b35f", "e633a9e5"], "limit": 4, "shuffle_seed": 1},
                "generation": {"max_new_tokens": 8},
                "capture": {"hooks": [HOOK], "dtype": "float32"},
                "runtime": {"progress": False, "compile_cache": None},
                "output": {"path": str(out)},
            }
        )
    )
    return out


def test_spliced_figures_on_a_real_run(harvested, make_config, tmp_path, capsys):
    from harvest.engine.model import logits as lm_logits
    from harvest.engine.prefill import forward
    from harvest.sae.cli import format_report
    from harvest.sae.export import load_sae
    from harvest.sae.spliced import spliced_eval
    from harvest.sae.trainer import train
    from harvest.weights.checkpoint import load_model

    over = dict(data__hook=HOOK, data__eval_fraction=0.3, train__steps=100, train__batch_size=64)
    cfg = make_config(harvested, tmp_path / "sae", train__spliced_sequences=1, **over)
    summary = train(cfg)
    sp = summary["spliced"]
    assert sp["sequences"] >= 1 and sp["hook"] == HOOK
    for part in ("prompt", "answer"):
        p = sp[part]
        assert np.isfinite([p["ce_clean"], p["ce_spliced"], p["ce_zero_ablation"], p["loss_recovered"]]).all()
        assert p["ce_increase"] == pytest.approx(p["ce_spliced"] - p["ce_clean"])
    assert sp["answers"]["answers"] == sp["sequences"] and 0 <= sp["answers"]["changed"] <= sp["sequences"]
    assert "spliced model (" in format_report(summary, str(tmp_path / "sae"))

    # The clean figure is the plain next-token cross-entropy of the stored tokens, computed independently.
    store = open_store(harvested)
    sid = int(sorted(store.sequences["sequence_id"])[0])
    lm = load_model("random:tiny", "float32")
    again = spliced_eval(load_sae(tmp_path / "sae" / "sae"), store, [sid], lm=lm)
    seq = store.sequence(sid)
    ids, answer = np.asarray(seq["token_id"]), np.asarray(seq["phase"])[1:] == 1
    x, _ = forward(lm.cfg, lm.params, jnp.asarray(ids[None], jnp.int32))
    logits = np.asarray(lm_logits(lm.cfg, lm.params, x[0, :-1]), np.float64)  # [T-1, V]
    top = logits.max(-1)
    ce = top + np.log(np.exp(logits - top[:, None]).sum(-1)) - logits[np.arange(len(ids) - 1), ids[1:]]
    assert again["prompt"]["ce_clean"] == pytest.approx(ce[~answer].mean(), rel=1e-5)
    assert again["answer"]["ce_clean"] == pytest.approx(ce[answer].mean(), rel=1e-5)
