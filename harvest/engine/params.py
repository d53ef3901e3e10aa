"""The one description of Qwen2 weights: it drives random init, checkpoint loading and sharding.

Params are a plain pytree:
    {"embed": [V, D], "final_norm": [D], "lm_head": [V, D] (untied only),
     "layers": ({"attn_norm": [D], "q_w": [H*Dh, D], ...}, ...)}          # one dict per layer
Linear weights keep the Hugging Face [out, in] layout, so loading never transposes or copies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from harvest.engine.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    hf_name: str  # Hugging Face tensor name; "{i}" is the layer index
    shape: Callable[[ModelConfig], tuple[int, ...]]
    axes: tuple[str | None, ...]  # logical axis names, mapped to a mesh by sharding rules
    init: str = "normal"  # "normal" | "ones" | "bias"


LAYER_SPECS: dict[str, ParamSpec] = {
    "attn_norm": ParamSpec("model.layers.{i}.input_layernorm.weight", lambda c: (c.d_model,), (None,), "ones"),
    "q_w": ParamSpec(
        "model.layers.{i}.self_attn.q_proj.weight", lambda c: (c.n_heads * c.head_dim, c.d_model), ("heads", None)
    ),
    "q_b": ParamSpec("model.layers.{i}.self_attn.q_proj.bias", lambda c: (c.n_heads * c.head_dim,), ("heads",), "bias"),
    "k_w": ParamSpec(
        "model.layers.{i}.self_attn.k_proj.weight", lambda c: (c.n_kv_heads * c.head_dim, c.d_model), ("kv_heads", None)
    ),
    "k_b": ParamSpec(
        "model.layers.{i}.self_attn.k_proj.bias", lambda c: (c.n_kv_heads * c.head_dim,), ("kv_heads",), "bias"
    ),
    "v_w": ParamSpec(
        "model.layers.{i}.self_attn.v_proj.weight", lambda c: (c.n_kv_heads * c.head_dim, c.d_model), ("kv_heads", None)
    ),
    "v_b": ParamSpec(
        "model.layers.{i}.self_attn.v_proj.bias", lambda c: (c.n_kv_heads * c.head_dim,), ("kv_heads",), "bias"
    ),
    # o_proj has no bias in Qwen2.
    "o_w": ParamSpec(
        "model.layers.{i}.self_attn.o_proj.weight", lambda c: (c.d_model, c.n_heads * c.head_dim), (None, "heads")
    ),
    "mlp_norm": ParamSpec("model.layers.{i}.post_attention_layernorm.weight", lambda c: (c.d_model,), (None,), "ones"),
    "gate_w": ParamSpec("model.layers.{i}.mlp.gate_proj.weight", lambda c: (c.d_mlp, c.d_model), ("mlp", None)),
    "up_w": ParamSpec("model.layers.{i}.mlp.up_proj.weight", lambda c: (c.d_mlp, c.d_model), ("mlp", None)),
    "down_w": ParamSpec("model.layers.{i}.mlp.down_proj.weight", lambda c: (c.d_model, c.d_mlp), (None, "mlp")),
}

GLOBAL_SPECS: dict[str, ParamSpec] = {
    "embed": ParamSpec("model.embed_tokens.weight", lambda c: (c.vocab_size, c.d_model), ("vocab", None)),
    "final_norm": ParamSpec("model.norm.weight", lambda c: (c.d_model,), (None,), "ones"),
    "lm_head": ParamSpec("lm_head.weight", lambda c: (c.vocab_size, c.d_model), ("vocab", None)),
}


def iter_specs(cfg: ModelConfig) -> Iterator[tuple[tuple, ParamSpec, str]]:
    """Yield (pytree path, spec, concrete hf name) for every tensor the config needs."""
    for name, spec in GLOBAL_SPECS.items():
        if name == "lm_head" and cfg.tie_embeddings:
            continue  # tied: the head is the embedding matrix
        yield (name,), spec, spec.hf_name
    for i in range(cfg.n_layers):
        for name, spec in LAYER_SPECS.items():
            yield ("layers", i, name), spec, spec.hf_name.format(i=i)


def assemble(cfg: ModelConfig, leaves: dict[tuple, jax.Array]) -> dict:
    """Build the params pytree from {path: array}."""
    params: dict = {"layers": tuple({} for _ in range(cfg.n_layers))}
    for path, value in leaves.items():
        if path[0] == "layers":
            params["layers"][path[1]][path[2]] = value
        else:
            params[path[0]] = value
    return params


def init_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32) -> dict:
    """Deterministic random weights. Biases are non-zero so tests exercise them."""
    rng = np.random.default_rng(seed)
    leaves = {}
    for path, spec, _ in iter_specs(cfg):
        shape = spec.shape(cfg)
        if spec.init == "ones":
            x = 1.0 + 0.1 * rng.standard_normal(shape)
        elif spec.init == "bias":
            x = 0.1 * rng.standard_normal(shape)
        else:
            x = 0.02 * rng.standard_normal(shape)
        leaves[path] = jnp.asarray(x.astype(np.float32), dtype=dtype)
    return assemble(cfg, leaves)


def param_axes(cfg: ModelConfig) -> dict:
    """The same pytree as the params, holding each leaf's logical axes (for sharding rules)."""
    return assemble(cfg, {path: spec.axes for path, spec, _ in iter_specs(cfg)})


def num_params(params: dict) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
