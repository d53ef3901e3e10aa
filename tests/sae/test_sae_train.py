"""Training on the planted store: quality far above the mean baseline, the planted features found, the
held-out split, the outputs, BatchTopK and the transcoder, and the demo config through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from harvest.data import open_store
from harvest.sae.data import TrainData, heldout_sequences
from harvest.sae.export import load_sae
from harvest.sae.metrics import MetricsLog
from harvest.sae.model import reconstruct
from harvest.sae.trainer import train
from helpers.runs import ROOT


def test_variance_explained_far_above_the_mean_baseline(trained):
    s = trained["summary"]
    # predicting the mean explains 0; the planted codes leave ~1% of the variance to noise
    assert s["train"]["variance_explained"] > 0.8
    assert s["eval"]["variance_explained"] > 0.8
    for phase in ("prefill", "decode"):  # prompt and answer tokens, held out
        assert s["eval"][phase]["tokens"] > 0 and s["eval"][phase]["variance_explained"] > 0.7
    assert s["eval"]["l0"] == pytest.approx(3.0)
    assert s["heldout_sequences"] >= 1 and s["eval_rows"] == s["eval"]["tokens"]


def test_planted_features_are_recovered(trained, planted):
    sae = load_sae(trained["out"] / "sae")
    w = np.asarray(sae.W_dec[...])  # [S, d] unit rows
    assert np.allclose(np.linalg.norm(w, axis=1), 1, atol=1e-5)
    best = np.abs(planted["features_a"] @ w.T).max(axis=1)  # [F] best cosine of each planted feature
    assert (best > 0.9).mean() >= 0.9, np.sort(best)


def test_outputs_and_metrics_lines(trained):
    out = trained["out"]
    for name in ("config.json", "summary.json", "metrics.jsonl", "sae/sae.json", "saelens/cfg.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "600").is_dir()
    rows = MetricsLog(out / "metrics.jsonl").read()
    logs = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logs] == [100, 200, 300, 400, 500, 600]
    for r in logs:
        assert {"fvu", "variance_explained", "l0", "dead", "dead_fraction", "tokens_per_second", "lr"} <= r.keys()
        assert r["prefill"]["tokens"] + r["decode"]["tokens"] == r["window_tokens"] == 100 * 128
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert [r["step"] for r in rows if "eval" in r] == [600]
    assert json.loads((out / "summary.json").read_text())["steps"] == 600


def test_heldout_sequences_never_reach_training(planted, make_config, tmp_path):
    cfg = make_config(planted["root"], tmp_path)
    store = open_store(planted["root"])
    data = TrainData(store, cfg)
    seq, first = store.token_column("sequence"), store.token_column("first_token")
    stream = data.batches()
    seen = np.concatenate([next(stream).rows for _ in range(3 * (data.num_train // 128))])  # 3 epochs
    assert not np.isin(seq[seen], data.heldout_ids).any()
    assert not first[seen].any()  # attention sinks excluded by default
    assert np.isin(seq[data.eval_rows], data.heldout_ids).all() and not first[data.eval_rows].any()
    per_epoch = data.num_train // 128 * 128
    assert len(np.unique(seen[:per_epoch])) == per_epoch  # each training row at most once per epoch


def test_heldout_split_depends_on_the_id_alone():
    ids = np.arange(10_000)
    held = heldout_sequences(ids, 0.1)
    assert 0.08 < held.mean() < 0.12
    sub = ids[::7]
    assert np.array_equal(heldout_sequences(sub, 0.1), held[::7])  # stable when sequences come and go
    assert heldout_sequences(np.array([5]), 0.5).sum() <= 1
    assert heldout_sequences(np.arange(3), 0.01).sum() == 1  # a tiny store still holds one out


def test_batchtopk_trains_and_infers_through_its_threshold(planted, make_config, tmp_path):
    cfg = make_config(planted["root"], tmp_path, sae__architecture="batchtopk", train__steps=120)
    s = train(cfg)
    assert s["eval"]["variance_explained"] > 0.5
    assert s["train"]["threshold"] > 0
    assert 1 < s["eval"]["l0"] < 10  # a threshold, not an exact k, at inference
    assert (tmp_path / "saelens" / "cfg.json").is_file()


def test_transcoder_predicts_the_output_hook(planted, make_config, tmp_path):
    ha, hb = planted["hooks"]
    cfg = make_config(
        planted["root"],
        tmp_path,
        sae__architecture="transcoder",
        data__hook=None,
        data__hook_in=ha,
        data__hook_out=hb,
        train__steps=150,
        output__saelens=False,
    )
    s = train(cfg)
    assert (s["d_in"], s["d_out"]) == (16, 24)
    assert s["eval"]["variance_explained"] > 0.5
    sae = load_sae(tmp_path / "sae")
    store = open_store(planted["root"])
    x = store.activations(ha, dtype="float32")[1:50]
    assert reconstruct(sae, x).shape == (49, 24)


def test_demo_config_through_the_cli(planted, make_config, tmp_path, capsys):
    from harvest.cli.main import main

    ha, _ = planted["hooks"]
    sets = [
        f"data.store={planted['root']}",
        f"data.hook={ha}",
        "data.eval_fraction=0.2",
        "sae.k=3",
        "train.steps=150",
        "train.lr=0.01",
        "train.warmup_steps=10",
        "train.eval_every=null",
        "train.log_every=50",
        f"output.path={tmp_path / 'demo'}",
        "runtime.progress=false",
        f"runtime.compile_cache={make_config.cache}",
    ]
    args = ["train", str(ROOT / "configs" / "sae-demo.yaml")]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "harvest train: topk d_sae 64 k 3" in printed and "eval (" in printed
    assert "spliced model: skipped (" in printed and "names no model" in printed  # a synthetic store has none
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["eval"]["variance_explained"] > 0.6
    assert main(args) == 0  # the same command again: already done, nothing retrained
    assert "this session: 0 steps" in capsys.readouterr().out


def test_demo_config_documents_every_key():
    from harvest.sae.config import TrainConfig, load

    raw = yaml.safe_load((ROOT / "configs" / "sae-demo.yaml").read_text())
    cfg = load(ROOT / "configs" / "sae-demo.yaml")
    for section, value in cfg.to_dict().items():
        assert set(raw[section]) == set(value), section
    assert isinstance(cfg, TrainConfig) and cfg.data.store == "outputs/demo"
