import pytest

from harvest.engine.config import ModelConfig, preset_hf_config
from harvest.engine.hooks import KINDS, Hook, HookError, kinds_by_layer, layers_needed, parse_hooks

CFG = ModelConfig.from_hf(preset_hf_config("tiny"))  # 4 layers, d_model 64, d_mlp 128, 4 heads, 2 kv heads, Dh 16


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
    assert len(names(["blocks.0.*"])) == len(KINDS) == 12


def test_widths():
    assert Hook(0, "mlp_post").width(CFG) == 128 and Hook(0, "resid_mid").width(CFG) == 64
    widths = {h.name: h.width(CFG) for h in parse_hooks(["hook_embed", "blocks.1.*", "ln_final.hook_normalized"], CFG)}
    assert widths == {
        "hook_embed": 64,
        "blocks.1.hook_resid_pre": 64,
        "blocks.1.attn.hook_q": 4 * 16,
        "blocks.1.attn.hook_k": 2 * 16,
        "blocks.1.attn.hook_v": 2 * 16,
        "blocks.1.attn.hook_z": 4 * 16,
        "blocks.1.hook_attn_out": 64,
        "blocks.1.hook_resid_mid": 64,
        "blocks.1.mlp.hook_pre": 128,
        "blocks.1.mlp.hook_pre_linear": 128,
        "blocks.1.mlp.hook_post": 128,
        "blocks.1.hook_mlp_out": 64,
        "blocks.1.hook_resid_post": 64,
        "ln_final.hook_normalized": 64,
    }


def test_transformerlens_hook_names_globs_and_order():
    assert names("hook_embed") == ["hook_embed"]
    assert names("ln_final.hook_normalized") == ["ln_final.hook_normalized"]
    assert names("blocks.*.attn.hook_z") == [f"blocks.{i}.attn.hook_z" for i in range(4)]
    assert names("blocks.*.attn.hook_?") == [f"blocks.{i}.attn.hook_{k}" for i in range(4) for k in "kqvz"]
    assert names("blocks.-1.mlp.hook_pre*") == ["blocks.3.mlp.hook_pre", "blocks.3.mlp.hook_pre_linear"]
    assert names("blocks.0-1.attn.hook_q") == ["blocks.0.attn.hook_q", "blocks.1.attn.hook_q"]
    # `blocks.` patterns never pick up the hooks outside the blocks
    for pat in ("blocks.*.hook_resid_post", "blocks.*", "blocks.0.*", "blocks.*.hook_*"):
        assert not {"hook_embed", "ln_final.hook_normalized"} & set(names(pat)), pat
    # forward order across layers: hook_embed first, ln_final last, whatever the patterns' order
    got = names(["ln_final.hook_normalized", "blocks.1.attn.hook_q", "hook_embed", "blocks.0.hook_resid_post"])
    assert got == ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.attn.hook_q", "ln_final.hook_normalized"]
    every = names("*")
    assert len(every) == 4 * len(KINDS) + 2 and every[0] == "hook_embed" and every[-1] == "ln_final.hook_normalized"
    assert str(Hook(-1, "embed")) == "hook_embed" and Hook(4, "ln_final").name == "ln_final.hook_normalized"


def test_layers_needed():
    def depth(patterns):
        return layers_needed(parse_hooks(patterns, CFG))

    assert depth("hook_embed") == 0
    assert depth("ln_final.hook_normalized") == depth(["hook_embed", "ln_final.hook_normalized"]) == 4
    assert depth(["hook_embed", "blocks.1.attn.hook_k"]) == 2
    assert depth("blocks.3.mlp.hook_pre_linear") == 4
    assert layers_needed(()) == 0
    # the blocks' kinds leave the hooks outside the blocks out
    assert kinds_by_layer(parse_hooks(["hook_embed", "blocks.2.attn.hook_v", "ln_final.hook_normalized"], CFG)) == {
        2: frozenset({"v"})
    }


@pytest.mark.parametrize("layer, kind", [(0, "embed"), (-1, "resid_pre"), (-1, "ln_final"), (0, "hook_resid_pre")])
def test_impossible_hooks_are_refused(layer, kind):
    with pytest.raises(HookError):
        Hook(layer, kind)


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("blocks.4.hook_resid_post", "layer 4 does not exist; valid layers are 0-3"),
        ("blocks.0.hook_resid", "unknown hook"),
        ("resid_post", "unknown hook"),
        ("blocks.0.hook_embed", "unknown hook"),
        ("blocks.*.hook_normalized", "unknown hook"),
        ("embed", "unknown hook"),
        ("blocks.4.attn.hook_z", "layer 4 does not exist"),
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
        assert "hook_embed" in str(e.value) and "ln_final.hook_normalized" in str(e.value)


def test_empty_hooks_rejected():
    with pytest.raises(HookError):
        parse_hooks([], CFG)
