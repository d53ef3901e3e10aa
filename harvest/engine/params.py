"""The one description of Qwen2 weights: every tensor's Hugging Face name, GGUF name, shape, logical axes
and init. It drives random init, safetensors loading and GGUF loading; the logical axes are declared for
sharding rules (harvest.engine.sharding maps them onto a device mesh).

Params are a plain pytree:
    {"embed": [V, D], "final_norm": [D], "lm_head": [V, D] (untied only),
     "layers": ({"attn_norm": [D], "q_w": [H*Dh, D], ...}, ...),          # one dict per layer
     "stacked": {"attn_norm": [L, D], ...}}                               # the engine's only (with_stacked)
Linear weights keep the Hugging Face [out, in] layout, so loading never transposes or copies.
Layers stay separate buffers: decode runs them unrolled, and XLA:CPU copies a slice of a stacked
[L, ...] array, static or not, rather than read it in place (+30% per decode step at 0.5B). Prefill
scans the stacked copy, which the engine makes once (`with_stacked`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from harvest.engine.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    hf_name: str  # Hugging Face tensor name; "{i}" is the layer index
    gguf_name: str  # llama.cpp GGUF tensor name (convert_hf_to_gguf.py's qwen2 mapping); "{i}" as above
    shape: Callable[[ModelConfig], tuple[int, ...]]
    axes: tuple[str | None, ...]  # logical axis names, for sharding rules to map onto a mesh
    init: str = "normal"  # "normal" | "ones" | "bias"


def _layer(hf: str, gguf: str, shape, axes, init: str = "normal") -> ParamSpec:
    return ParamSpec(f"model.layers.{{i}}.{hf}", f"blk.{{i}}.{gguf}", shape, axes, init)


# GGUF stores [out, in] weights with ne = [in, out], i.e. the same row-major layout as Hugging Face,
# so one shape serves both formats.
LAYER_SPECS: dict[str, ParamSpec] = {
    "attn_norm": _layer("input_layernorm.weight", "attn_norm.weight", lambda c: (c.d_model,), (None,), "ones"),
    "q_w": _layer(
        "self_attn.q_proj.weight", "attn_q.weight", lambda c: (c.n_heads * c.head_dim, c.d_model), ("heads", None)
    ),
    "q_b": _layer("self_attn.q_proj.bias", "attn_q.bias", lambda c: (c.n_heads * c.head_dim,), ("heads",), "bias"),
    "k_w": _layer(
        "self_attn.k_proj.weight", "attn_k.weight", lambda c: (c.n_kv_heads * c.head_dim, c.d_model), ("kv_heads", None)
    ),
    "k_b": _layer(
        "self_attn.k_proj.bias", "attn_k.bias", lambda c: (c.n_kv_heads * c.head_dim,), ("kv_heads",), "bias"
    ),
    "v_w": _layer(
        "self_attn.v_proj.weight", "attn_v.weight", lambda c: (c.n_kv_heads * c.head_dim, c.d_model), ("kv_heads", None)
    ),
    "v_b": _layer(
        "self_attn.v_proj.bias", "attn_v.bias", lambda c: (c.n_kv_heads * c.head_dim,), ("kv_heads",), "bias"
    ),
    # o_proj has no bias in Qwen2.
    "o_w": _layer(
        "self_attn.o_proj.weight", "attn_output.weight", lambda c: (c.d_model, c.n_heads * c.head_dim), (None, "heads")
    ),
    "mlp_norm": _layer("post_attention_layernorm.weight", "ffn_norm.weight", lambda c: (c.d_model,), (None,), "ones"),
    "gate_w": _layer("mlp.gate_proj.weight", "ffn_gate.weight", lambda c: (c.d_mlp, c.d_model), ("mlp", None)),
    "up_w": _layer("mlp.up_proj.weight", "ffn_up.weight", lambda c: (c.d_mlp, c.d_model), ("mlp", None)),
    "down_w": _layer("mlp.down_proj.weight", "ffn_down.weight", lambda c: (c.d_model, c.d_mlp), (None, "mlp")),
}

GLOBAL_SPECS: dict[str, ParamSpec] = {
    "embed": ParamSpec(
        "model.embed_tokens.weight", "token_embd.weight", lambda c: (c.vocab_size, c.d_model), ("vocab", None)
    ),
    "final_norm": ParamSpec("model.norm.weight", "output_norm.weight", lambda c: (c.d_model,), (None,), "ones"),
    "lm_head": ParamSpec("lm_head.weight", "output.weight", lambda c: (c.vocab_size, c.d_model), ("vocab", None)),
}


class Leaf(NamedTuple):
    """One tensor a config needs: where it goes in the params pytree and what each format calls it."""

    path: tuple  # ("embed",) or ("layers", i, "q_w")
    spec: ParamSpec
    shape: tuple[int, ...]
    hf_name: str  # concrete: the layer index filled in
    gguf_name: str


def iter_specs(cfg: ModelConfig) -> Iterator[Leaf]:
    """Every tensor the config needs, in a fixed order: globals first, then layer by layer."""
    for name, spec in GLOBAL_SPECS.items():
        if name == "lm_head" and cfg.tie_embeddings:
            continue  # tied: the head is the embedding matrix
        yield Leaf((name,), spec, spec.shape(cfg), spec.hf_name, spec.gguf_name)
    for i in range(cfg.n_layers):
        for name, spec in LAYER_SPECS.items():
            yield Leaf(("layers", i, name), spec, spec.shape(cfg), spec.hf_name.format(i=i), spec.gguf_name.format(i=i))


def assemble(cfg: ModelConfig, leaves: dict[tuple, jax.Array]) -> dict:
    """Build the params pytree from {path: array}."""
    params: dict = {"layers": tuple({} for _ in range(cfg.n_layers))}
    for path, value in leaves.items():
        if path[0] == "layers":
            params["layers"][path[1]][path[2]] = value
        else:
            params[path[0]] = value
    return params


def stacked(params: dict) -> dict:
    """{name: [L, ...]}: the layer tensors stacked for a `lax.scan` over layers: params["stacked"] where
    `with_stacked` made it, else stacked here (inside the caller's jit, a copy of every layer per call)."""
    if "stacked" in params:
        return params["stacked"]
    layers = params["layers"]
    return {name: jnp.stack([lp[name] for lp in layers]) for name in layers[0]}


def with_stacked(params: dict, keep_layers: bool = True) -> dict:
    """params plus "stacked", made once. Stacking inside each prefill call copies every layer weight
    (1.4 GB at 0.5B fp32): on XLA:CPU that was a quarter of an 8 x 128 call (8.8 s against 6.1 s, real
    weights). The call held that copy while it ran, so keeping it raises no peak. Each leaf keeps its
    layers' sharding (propagated). keep_layers=False drops the per-layer buffers ("layers" becomes ()):
    an engine that never decodes needs only the stack."""
    if not params["layers"]:
        return params
    stack = jax.jit(stacked)(params)
    return {**params, "layers": params["layers"] if keep_layers else (), "stacked": stack}


def init_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32) -> dict:
    """Deterministic random weights. Biases are non-zero so tests exercise them."""
    rng = np.random.default_rng(seed)
    leaves = {}
    for leaf in iter_specs(cfg):
        if leaf.spec.init == "ones":
            x = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        elif leaf.spec.init == "bias":
            x = 0.1 * rng.standard_normal(leaf.shape)
        else:
            x = 0.02 * rng.standard_normal(leaf.shape)
        leaves[leaf.path] = jnp.asarray(x.astype(np.float32), dtype=dtype)
    return assemble(cfg, leaves)


def param_axes(cfg: ModelConfig) -> dict:
    """The same pytree as the params, holding each leaf's logical axes (harvest.engine.sharding's rules)."""
    return assemble(cfg, {leaf.path: leaf.spec.axes for leaf in iter_specs(cfg)})


def num_params(params: dict) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
