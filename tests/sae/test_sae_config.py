"""Refusals: every bad config, store or option is one HarvestError line naming the key and the fix."""

from __future__ import annotations

import pytest

from harvest.cli.main import main
from harvest.errors import HarvestError
from harvest.sae.config import ConfigError, from_dict
from harvest.sae.sharding import build_mesh
from harvest.sae.trainer import Trainer


@pytest.mark.parametrize(
    "over,match",
    [
        ({"sae__kk": 3}, r"unknown key 'sae\.kk'; sae has architecture"),
        ({"train__steps": "10"}, r"train\.steps: .*'10'"),
        ({"train__tokens": 1000}, r"train\.steps, train\.tokens: give exactly one"),
        ({"train__steps": None, "train__tokens": 10}, r"train\.tokens: 10 is fewer than one batch"),
        ({"sae__architecture": "gated"}, r"sae\.architecture: 'gated' is not one of topk, batchtopk, transcoder"),
        ({"sae__architecture": "transcoder"}, r"data\.hook_in, data\.hook_out: a transcoder needs both"),
        ({"data__hook": None}, r"data\.hook: sae\.architecture topk needs it"),
        ({"data__eval_fraction": 1.0}, r"data\.eval_fraction: 1\.0 is impossible; it must be in \[0, 1\)"),
        ({"runtime__mesh": {"dat": 2}}, r"runtime\.mesh: axes are data \(required\) and model"),
        ({"runtime__mesh": {"data": 0}}, r"runtime\.mesh\.data: 0 is impossible"),
        ({"train__warmup_steps": 39}, r"train\.warmup_steps: 39 \+ decay 8 exceed the 40 steps"),
        ({"data__exclude": ["sinks"]}, r"data\.exclude\[0\]: 'sinks' is not one of first_token, outliers"),
    ],
)
def test_bad_keys_are_one_line(make_config, tmp_path, over, match):
    with pytest.raises(ConfigError, match=match) as e:
        make_config("store", tmp_path, **over)
    assert "\n" not in str(e.value)


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"unknown section 'model'; sections are data, sae, train, output, runtime"):
        from_dict({"model": {}})


@pytest.mark.parametrize(
    "over,match",
    [
        ({"data__hook": "blocks.9.hook_resid_post"}, r"data\.hook: .*blocks\.9\.hook_resid_post"),
        ({"sae__k": 65}, r"sae\.k: 65 is more than the 64 latents"),
        ({"train__batch_size": 100_000}, r"data: .* fewer than train\.batch_size=100000"),
        ({"data__segment": ["answers"]}, r"^data\.segment: 'answers' is not one of this run's segments"),
    ],
)
def test_store_dependent_refusals(planted, make_config, tmp_path, over, match):
    with pytest.raises(HarvestError, match=match) as e:
        Trainer(make_config(planted["root"], tmp_path, **over))
    assert "\n" not in str(e.value)


def test_mesh_needs_the_devices():
    with pytest.raises(ConfigError, match=r"runtime\.mesh: .* needs 3 devices, there are 1"):
        build_mesh({"data": 3}, 6, 6)


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harvest: error: config file") and "configs/sae-demo.yaml" in err and "\n" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 5, warmup_steps: 0}\nsae: {k: 0}\n")
    assert main(["train", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == "harvest: error: sae.k: 0 is impossible; it must be >= 1"
    store = tmp_path / "nothing"
    sets = ["sae.k=4", f"data.store={store}", "data.hook=h", f"output.path={tmp_path / 'out'}"]
    assert main(["train", str(bad), *[a for s in sets for a in ("--set", s)]]) == 2
    assert "harvest: error: data.store: no run folder at" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written
