"""Exact resume: a training SIGKILLed mid-way (harvest.failpoints, in a real subprocess) and resumed
ends with bit-identical weights and metrics to one that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from harvest.sae.config import ConfigError
from harvest.sae.metrics import MetricsLog
from harvest.sae.trainer import Trainer, train
from helpers.runs import ROOT

TIMING = ("tokens_per_second",)  # the only fields allowed to differ


def _metrics(out) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in MetricsLog(out / "metrics.jsonl").read()]


def test_sigkill_then_resume_gives_the_same_weights(planted, make_config, tmp_path):
    over = dict(train__steps=60, train__checkpoint_every=20, train__log_every=10, train__eval_every=30)
    reference = tmp_path / "reference"
    train(make_config(planted["root"], reference, **over))

    killed = tmp_path / "killed"
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(make_config.raw(planted["root"], killed, **over)))
    env = {**os.environ, "HARVEST_FAILPOINT": "train.step@51", "JAX_PLATFORMS": "cpu"}  # dies before step 51
    done = subprocess.run(
        [sys.executable, "-m", "harvest.train", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.isdigit()) == ["20", "40"]
    assert max(r["step"] for r in MetricsLog(killed / "metrics.jsonl").read()) == 50  # lines past the checkpoint

    summary = train(make_config(planted["root"], killed, **over))
    assert summary["session"]["resumed_from"] == 40 and summary["session"]["steps"] == 20

    a, b = load_file(str(reference / "sae" / "sae.safetensors")), load_file(str(killed / "sae" / "sae.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert _metrics(killed) == _metrics(reference)  # nothing lost, nothing logged twice


def test_resume_refuses_a_changed_config(planted, make_config, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(make_config(planted["root"], tmp_path).to_dict()))  # session 1
    with pytest.raises(ConfigError, match=r"sae\.k: 3 -> 4.*--overwrite"):
        Trainer(make_config(planted["root"], tmp_path, sae__k=4))
    # keys that do not change the weights may change between sessions
    Trainer(make_config(planted["root"], tmp_path, train__log_every=5, runtime__mesh={"data": -1}))
