"""The one parameter description drives init, loading (see tests/weights) and declares sharding axes."""

import jax
import numpy as np

from harvest.engine.config import ModelConfig, preset_hf_config
from harvest.engine.params import (
    GLOBAL_SPECS,
    LAYER_SPECS,
    init_params,
    iter_specs,
    num_params,
    param_axes,
    stacked,
    with_stacked,
)


def test_axes_tree_matches_params_and_ranks():
    for tie in (True, False):
        cfg = ModelConfig.from_hf({**preset_hf_config("tiny"), "tie_word_embeddings": tie})
        params = init_params(cfg)
        axes = param_axes(cfg)
        leaves = jax.tree_util.tree_leaves(params)
        axes_leaves = jax.tree_util.tree_leaves(
            axes, is_leaf=lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
        )
        assert len(leaves) == len(axes_leaves) == len(list(iter_specs(cfg)))
        for x, ax in zip(leaves, axes_leaves):
            assert x.ndim == len(ax)
        assert ("lm_head" in params) is not tie
        # GQA shapes: q has n_heads * head_dim rows, k/v n_kv_heads * head_dim; o_proj has no bias
        layer = params["layers"][0]
        assert layer["q_w"].shape == (cfg.n_heads * cfg.head_dim, cfg.d_model)
        assert layer["k_b"].shape == (cfg.n_kv_heads * cfg.head_dim,) and "o_b" not in layer
    assert num_params(init_params(ModelConfig.from_hf(preset_hf_config("tiny")))) > 151936 * 64


def test_every_spec_names_its_tensor_in_both_formats():
    """Both loaders take names from this table: each spec has an HF and a GGUF name, per-layer ones
    carry the layer index, and no two tensors of a model share a name in either format."""
    for spec in LAYER_SPECS.values():
        assert spec.hf_name.startswith("model.layers.{i}.") and spec.gguf_name.startswith("blk.{i}.")
    for spec in GLOBAL_SPECS.values():
        assert spec.gguf_name and "{i}" not in spec.gguf_name and "{i}" not in spec.hf_name
    for spec in (*LAYER_SPECS.values(), *GLOBAL_SPECS.values()):
        assert spec.hf_name.rsplit(".", 1)[1] == spec.gguf_name.rsplit(".", 1)[1]  # weight/bias agree
    cfg = ModelConfig.from_hf({**preset_hf_config("tiny"), "tie_word_embeddings": False})
    leaves = list(iter_specs(cfg))
    assert len({x.hf_name for x in leaves}) == len({x.gguf_name for x in leaves}) == len(leaves)
    assert ("layers", 1, "q_w") in {x.path for x in leaves}
    by_path = {x.path: x for x in leaves}
    assert by_path[("layers", 1, "q_w")].gguf_name == "blk.1.attn_q.weight"
    assert by_path[("layers", 1, "q_w")].hf_name == "model.layers.1.self_attn.q_proj.weight"
    assert by_path[("embed",)].gguf_name == "token_embd.weight"
    assert all(x.shape == x.spec.shape(cfg) for x in leaves)


def test_with_stacked_equals_stacking_in_the_jit_and_can_drop_the_layers():
    """Prefill scans params["stacked"] when the engine made it once, else stacks inside its jit: the same arrays."""
    cfg = ModelConfig.from_hf(preset_hf_config("tiny"))
    params = init_params(cfg)
    made = with_stacked(params)
    assert made["layers"] is params["layers"] and stacked(made) is made["stacked"]
    in_jit = jax.jit(stacked)(params)
    assert set(in_jit) == set(made["stacked"]) == set(params["layers"][0])
    for name, x in in_jit.items():
        assert x.shape == (cfg.n_layers, *params["layers"][0][name].shape)
        np.testing.assert_array_equal(np.asarray(made["stacked"][name]), np.asarray(x))
        np.testing.assert_array_equal(np.asarray(x[1]), np.asarray(params["layers"][1][name]))
    only = with_stacked(params, keep_layers=False)
    assert only["layers"] == () and only["embed"] is params["embed"]
    empty = {**params, "layers": ()}  # no layer runs (hook_embed alone): nothing to stack
    assert with_stacked(empty) is empty
