import pytest

from harvest.engine.config import ModelConfig, preset_hf_config
from harvest.engine.hooks import Hook, HookError, parse_hooks

CFG = ModelConfig.from_hf(preset_hf_config("tiny"))  # 4 layers, d_model 64, d_mlp 128


def names(patterns):
    return [h.name for h in parse_hooks(patterns, CFG)]


def test_names_globs_ranges_and_negative_layers():
    assert names(["blocks.1.hook_resid_post"]) == ["blocks.1.hook_resid_post"]
    assert names(["blocks.*.hook_resid_post"]) == [f"blocks.{i}.hook_resid_post" for i in range(4)]
    assert names(["blocks.1-2.mlp.hook_post"]) == ["blocks.1.mlp.hook_post", "blocks.2.mlp.hook_post"]
    assert names(["blocks.{0..1}.hook_attn_out"]) == ["blocks.0.hook_attn_out", "blocks.1.hook_attn_out"]
    assert names(["blocks.-1.hook_mlp_out"]) == ["blocks.3.hook_mlp_out"]
    # sorted and de-duplicated: the order of patterns never changes the data
    assert names(["blocks.2.hook_resid_pre", "blocks.0.hook_resid_pre", "blocks.2.hook_resid_pre"]) == [
        "blocks.0.hook_resid_pre",
        "blocks.2.hook_resid_pre",
    ]
    assert len(names(["blocks.0.*"])) == 6


def test_widths():
    assert Hook(0, "mlp_post").width(CFG) == 128 and Hook(0, "resid_mid").width(CFG) == 64


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("blocks.4.hook_resid_post", "layer 4 does not exist; valid layers are 0-3"),
        ("blocks.0.hook_resid", "unknown hook"),
        ("resid_post", "unknown hook"),
        ("blocks.2-9.hook_resid_post", "outside 0-3"),
        ("blocks.-5.hook_resid_post", "out of range"),
    ],
)
def test_bad_hooks_are_rejected_with_choices(bad, msg):
    with pytest.raises(HookError, match=msg) as e:
        parse_hooks([bad], CFG)
    assert "\n" not in str(e.value)
    if "unknown" in msg:
        assert "hook_resid_post" in str(e.value) and "mlp.hook_post" in str(e.value)


def test_empty_hooks_rejected():
    with pytest.raises(HookError):
        parse_hooks([], CFG)
