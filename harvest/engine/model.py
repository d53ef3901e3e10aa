"""The Qwen2 decoder as pure functions over a params pytree.

Shapes: B batch, S sequence, D d_model, H query heads, K kv heads, G = H // K, Dh head_dim,
F d_mlp, V vocab. Matmuls accumulate in float32 (`preferred_element_type`) whatever the weight
dtype; norms, RoPE and softmax run in float32.

`decoder` (all layers) is shared by prefill and decode; they differ only in the attention function
they pass, which also owns each layer's KV cache.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from harvest.engine.config import ModelConfig
from harvest.engine.hooks import Hook, kinds_by_layer

F32 = jnp.float32
NEG_INF = -1e30  # finite, so fully masked rows (padding queries) never produce NaN


def linear(x, w, b=None):
    """x [..., in] @ w[out, in].T (+ b), accumulated in float32, returned in x's dtype."""
    y = jnp.einsum("...i,oi->...o", x, w, preferred_element_type=F32)
    if b is not None:
        y = y + b.astype(F32)
    return y.astype(x.dtype)


def rms_norm(x, w, eps):
    xf = x.astype(F32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (w.astype(F32) * xf).astype(x.dtype)


def rope(x, positions, theta):
    """Split-half rotary embedding (transformers' rotate_half), in float32.

    x [B, S, N, Dh], positions [B, S] int32.
    """
    dh = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=F32) / dh))  # [Dh/2]
    freqs = positions.astype(F32)[..., None] * inv_freq  # [B, S, Dh/2]
    cos = jnp.cos(jnp.concatenate([freqs, freqs], -1))[:, :, None, :]  # [B, S, 1, Dh]
    sin = jnp.sin(jnp.concatenate([freqs, freqs], -1))[:, :, None, :]
    xf = x.astype(F32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def causal_attention(q, k, v, chunk: int):
    """Causal self-attention over a right-padded prompt, flash-style for long prompts.

    q [B, P, H, Dh], k/v [B, P, K, Dh] -> [B, P, H, Dh]. Padding needs no mask: a real query i
    only sees keys j <= i, which are real. Scores are materialised per (chunk x chunk) block,
    and key blocks above the diagonal are skipped, so memory is O(B*H*chunk^2), not O(B*H*P^2).
    """
    b, p, h, dh = q.shape
    kh = k.shape[2]
    scale = dh**-0.5
    q = q.reshape(b, p, kh, h // kh, dh)  # [B, P, K, G, Dh]
    if p <= chunk:
        s = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=F32) * scale  # [B, K, G, P, P]
        mask = jnp.tril(jnp.ones((p, p), bool))
        s = jnp.where(mask, s, NEG_INF)
        w = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", w, v, preferred_element_type=F32)
        return out.reshape(b, p, h, dh).astype(v.dtype)
    if p % chunk:
        raise ValueError(f"prompt bucket {p} must be a multiple of the attention chunk {chunk}")
    n = p // chunk
    qb = q.reshape(b, n, chunk, kh, h // kh, dh)
    kb = k.reshape(b, n, chunk, kh, dh)
    vb = v.reshape(b, n, chunk, kh, dh)
    tri = jnp.arange(chunk)[:, None] >= jnp.arange(chunk)[None, :]  # [C, C]

    def one_query_block(i):
        qi = qb[:, i]  # [B, C, K, G, Dh]

        def one_key_block(j, carry):
            m, denom, acc = carry
            s = jnp.einsum("bqkgd,bskd->bkgqs", qi, kb[:, j], preferred_element_type=F32) * scale
            s = jnp.where((j < i) | tri, s, NEG_INF)  # [B, K, G, C, C]
            m_new = jnp.maximum(m, s.max(-1))
            pr = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            denom = denom * corr + pr.sum(-1)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", pr.astype(v.dtype), vb[:, j], preferred_element_type=F32)
            return m_new, denom, acc * corr[..., None] + pv

        shape = (b, kh, h // kh, chunk)
        init = (jnp.full(shape, NEG_INF, F32), jnp.zeros(shape, F32), jnp.zeros(shape + (dh,), F32))
        _, denom, acc = jax.lax.fori_loop(0, i + 1, one_key_block, init)  # causal: j <= i only
        return (acc / denom[..., None]).astype(v.dtype)  # [B, K, G, C, Dh]

    out = jax.lax.map(one_query_block, jnp.arange(n))  # [n, B, K, G, C, Dh]
    return out.transpose(1, 0, 4, 2, 3, 5).reshape(b, p, h, dh)


def cached_attention(q, k_cache, v_cache, valid):
    """One query per row against the whole cache.

    q [B, 1, H, Dh], k/v_cache [B, S_max, K, Dh], valid [B, S_max] bool -> [B, 1, H, Dh].
    """
    b, _, h, dh = q.shape
    kh = k_cache.shape[2]
    q = q.reshape(b, kh, h // kh, dh)  # [B, K, G, Dh]
    s = jnp.einsum("bkgd,bskd->bkgs", q, k_cache, preferred_element_type=F32) * dh**-0.5  # [B, K, G, S_max]
    s = jnp.where(valid[:, None, None, :], s, NEG_INF)
    w = jax.nn.softmax(s, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkgs,bskd->bkgd", w, v_cache, preferred_element_type=F32)
    return out.reshape(b, 1, h, dh).astype(v_cache.dtype)


AttentionFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, object]]


def block(cfg: ModelConfig, p: dict, x, positions, attend: AttentionFn, capture: frozenset[str]):
    """One decoder layer. x [B, S, D], positions [B, S].

    `attend(q, k, v) -> (out [B, S, H, Dh], new_layer_cache)` supplies attention and owns the
    cache. Returns (x_out, new_layer_cache, {kind: activation}) for the kinds in `capture`.
    """
    b, s, _ = x.shape
    acts = {"resid_pre": x}
    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q = linear(h, p["q_w"], p["q_b"]).reshape(b, s, cfg.n_heads, cfg.head_dim)
    k = linear(h, p["k_w"], p["k_b"]).reshape(b, s, cfg.n_kv_heads, cfg.head_dim)
    v = linear(h, p["v_w"], p["v_b"]).reshape(b, s, cfg.n_kv_heads, cfg.head_dim)
    q = rope(q, positions, cfg.rope_theta)
    k = rope(k, positions, cfg.rope_theta)
    attn, layer_cache = attend(q, k, v)
    acts["attn_out"] = linear(attn.reshape(b, s, -1), p["o_w"])  # no o_proj bias
    x = acts["resid_mid"] = x + acts["attn_out"]
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    acts["mlp_post"] = jax.nn.silu(linear(h, p["gate_w"])) * linear(h, p["up_w"])  # [B, S, F]
    acts["mlp_out"] = linear(acts["mlp_post"], p["down_w"])
    x = acts["resid_post"] = x + acts["mlp_out"]
    return x, layer_cache, {k: a for k, a in acts.items() if k in capture}


def decoder(cfg: ModelConfig, params, x, positions, attend, hooks: tuple[Hook, ...]):
    """All layers. `attend(layer, q, k, v) -> (out, new_layer_cache)` is the phase's attention.

    Returns (x [B, S, D] before the final norm, new cache tuple, {hook name: [B, S, width]}).
    """
    wanted = kinds_by_layer(hooks)
    cache, acts = [], {}
    for layer, lp in enumerate(params["layers"]):
        x, layer_cache, layer_acts = block(
            cfg, lp, x, positions, functools.partial(attend, layer), wanted.get(layer, frozenset())
        )
        cache.append(layer_cache)
        acts |= {Hook(layer, kind).name: a for kind, a in layer_acts.items()}
    return x, tuple(cache), acts


def embed(params, tokens):
    return jnp.take(params["embed"], tokens, axis=0)  # [B, S, D]


def logits(cfg: ModelConfig, params, h):
    """h [..., D] (pre final norm) -> float32 logits [..., V]."""
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    return jnp.einsum("...d,vd->...v", h, head, preferred_element_type=F32)
