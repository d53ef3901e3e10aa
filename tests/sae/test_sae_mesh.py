"""Data parallel (and latent-sharded) training on a 4-device CPU mesh follows the 1-device loss trajectory.

XLA's host platform is split into 4 devices in a subprocess (XLA_FLAGS must be set before JAX starts);
the same training runs on meshes {data: 1}, {data: 4} and {data: 2, model: 2}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from helpers.runs import ROOT

SCRIPT = r"""
import json, sys
import jax
from harvest.sae.config import from_dict
from harvest.sae.metrics import MetricsLog
from harvest.sae.trainer import Trainer

raw = json.loads(sys.argv[1])
assert jax.device_count() == 4, jax.devices()
out = {}
for name, mesh in [("1", {"data": 1}), ("4", {"data": -1}), ("2x2", {"data": 2, "model": 2})]:
    raw["runtime"]["mesh"] = mesh
    raw["output"]["path"] = raw["output"]["path"].rsplit("/", 1)[0] + "/mesh-" + name
    trainer = Trainer(from_dict(raw))
    summary = trainer.run()
    rows = MetricsLog(trainer.metrics.path).read()
    out[name] = {
        "loss": [r["loss"] for r in rows if "loss" in r],
        "fvu": [r["fvu"] for r in rows if "loss" in r],
        "mesh": summary["session"]["mesh"],
        "w_enc": str(trainer.shardings.params["W_enc"].get_value().spec),
        "eval": summary["eval"]["fvu"],
    }
print("RESULT " + json.dumps(out))
"""


def test_mesh_runs_follow_the_one_device_trajectory(planted, make_config, tmp_path):
    raw = make_config.raw(
        planted["root"], tmp_path / "x", train__steps=30, train__log_every=1, train__dead_tokens=1000, sae__k_aux=16
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(raw)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert res["4"]["mesh"] == {"data": 4, "model": 1} and res["2x2"]["mesh"] == {"data": 2, "model": 2}
    assert "model" in res["2x2"]["w_enc"]  # latents really split over the model axis
    one = np.array(res["1"]["loss"])
    assert len(one) == 30 and one[-1] < one[0]
    for name in ("4", "2x2"):
        np.testing.assert_allclose(res[name]["loss"], one, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(res[name]["fvu"], res["1"]["fvu"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(res[name]["eval"], res["1"]["eval"], rtol=1e-5)
