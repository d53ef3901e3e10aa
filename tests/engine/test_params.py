"""The one parameter description drives init, loading (see test_checkpoint) and sharding axes."""

import jax

from harvest.engine.config import ModelConfig, preset_hf_config
from harvest.engine.params import init_params, iter_specs, num_params, param_axes


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
