"""The Qwen2 decoder as pure functions over a params pytree.

Shapes: B batch, S sequence, D d_model, H query heads, K kv heads, G = H // K, Dh head_dim,
F d_mlp, V vocab. Matmuls accumulate in float32 (`preferred_element_type`) whatever the weight
dtype; norms, RoPE and softmax run in float32.

`block` (one layer) is shared by every phase; they differ only in the attention function they pass.
Prefill runs the layers as a `lax.scan` (`scan_layers`), decode as straight-line code (`unrolled_layers`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from harvest.engine.config import ModelConfig
from harvest.engine.hooks import Hook, HookError, kinds_by_layer
from harvest.engine.params import stacked

F32 = jnp.float32
NEG_INF = -1e30  # finite, so fully masked rows (padding queries) never produce NaN


def linear(x, w, b=None):
    """x [..., in] @ w[out, in].T (+ b), accumulated in float32, returned in x's dtype."""
    y = jnp.einsum("...i,oi->...o", x, w, preferred_element_type=F32)
    if b is not None:
        y = y + b.astype(F32)
    return y.astype(x.dtype)


def rms_normalize(x, eps):
    """x / sqrt(mean(x^2) + eps) in float32: RMSNorm before its weight (TransformerLens' hook_normalized)."""
    xf = x.astype(F32)
    return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def rms_norm(x, w, eps):
    return (w.astype(F32) * rms_normalize(x, eps)).astype(x.dtype)


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


def _scores(q, keys):
    """q [B, K, Q, Dh] . keys [B, K, S, Dh] -> [B, K, Q, S] in float32 (unscaled)."""
    return jnp.einsum("bkqd,bksd->bkqs", q, keys, preferred_element_type=F32)


def _weighted(p, vals):
    """Weights p [B, K, Q, S] times values [B, K, S, Dh] -> [B, K, Q, Dh] in float32."""
    return jnp.einsum("bkqs,bksd->bkqd", p.astype(vals.dtype), vals, preferred_element_type=F32)


def _fold(carry, s, vals):
    """Flash-style: fold one block of scores s [B, K, Q, n] and its values [B, K, n, Dh] into the running
    (max [B, K, Q], sum of weights [B, K, Q], weighted values [B, K, Q, Dh])."""
    m, denom, acc = carry
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m - m_new)
    return m_new, denom * corr + p.sum(-1), acc * corr[..., None] + _weighted(p, vals)


def chunk_attention(q, k, v, prior_k, prior_v, start, block: int):
    """A prompt chunk attends to its row's earlier chunks (in the cache) and causally to itself.

    q [R, C, H, Dh], k/v [R, C, K, Dh] (the chunk), prior_k/v [R, K, S, Dh] (the row's cache, or None),
    start [R] int32: the chunk's first column, a multiple of `block` (== C), so cache block j is
    wholly before the chunk (j * C < start) or wholly not. Flash-style: the diagonal block first, then
    a dynamic loop over only the blocks some row needs; fully masked blocks add exactly zero.
    The G query heads of a KV head are merged into the rows of one matmul ([R, K, G*C, Dh]): on
    XLA:CPU that is 2.5x faster than a 5-d einsum, whose [R, K, G, C, C] scores get transposed.
    """
    r, c, h, dh = q.shape
    kh = k.shape[2]
    g = h // kh
    scale = dh**-0.5
    q = q.reshape(r, c, kh, g, dh).transpose(0, 2, 3, 1, 4).reshape(r, kh, g * c, dh)  # [R, K, G*C, Dh]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [R, K, C, Dh]

    def scores(keys, ok):  # keys [R, K, C, Dh], ok broadcastable to [R, K, G*C, C]
        return jnp.where(ok, _scores(q, keys) * scale, NEG_INF)

    s = scores(k, jnp.tile(jnp.tril(jnp.ones((c, c), bool)), (g, 1)))  # [R, K, G*C, C]
    m = s.max(-1)
    p = jnp.exp(s - m[..., None])
    init = (m, p.sum(-1), _weighted(p, v))

    def one_block(j, carry):
        kb = jax.lax.dynamic_slice_in_dim(prior_k, j * block, block, axis=2)
        vb = jax.lax.dynamic_slice_in_dim(prior_v, j * block, block, axis=2)
        return _fold(carry, scores(kb, (j * block < start)[:, None, None, None]), vb)

    m, denom, acc = init if prior_k is None else jax.lax.fori_loop(0, jnp.max(start) // block, one_block, init)
    out = (acc / denom[..., None]).astype(v.dtype)  # [R, K, G*C, Dh]
    return out.reshape(r, kh, g, c, dh).transpose(0, 3, 1, 2, 4).reshape(r, c, h, dh)


DECODE_BLOCK = 128  # cache columns per step of the bounded decode attention (the cache is a whole number of them)


def bounded_decode_attention() -> bool:
    """Whether decode reads only the cache blocks up to the longest live row (cached_attention's blocks):
    on XLA:CPU; elsewhere one pass over the cache is faster."""
    return jax.default_backend() == "cpu"


def decode_blocks(length):
    """The cache blocks (of DECODE_BLOCK columns) that hold columns [0, length)."""
    return (length + DECODE_BLOCK - 1) // DECODE_BLOCK


def cached_attention(q, k, v, k_cache, v_cache, layer, length, blocks=None):
    """One query per row against its cache columns [0, length) and its own key and value.

    q [B, 1, H, Dh]; k/v [B, 1, K, Dh]: this token's, not yet in the cache (decode writes every layer's
    at once: one scatter instead of one per layer, each a kernel XLA compiles); k/v_cache
    [L, B, K, S_max, Dh]: every layer's; layer: uint32 scalar, traced (a constant would give each layer its
    own copy of the loop below to compile); length [B] int32 -> [B, 1, H, Dh].
    blocks None: one masked pass over the layer's cache. blocks (int32, decode_blocks of the longest length
    that matters; longer rows get garbage): only the first `blocks` blocks of DECODE_BLOCK columns are read,
    flash-style (a running max and sum). On XLA:CPU a pass over all S_max columns costs 2-3x the bounded
    loop at half the cache (bench in issue #9's note). A cache that is not a whole number of blocks gets
    the single pass.
    """
    b, _, h, dh = q.shape
    _, _, kh, s_max, _ = k_cache.shape
    q = q.reshape(b, kh, h // kh, dh)  # [B, K, G, Dh]
    scale = dh**-0.5
    zero, layer = jnp.uint32(0), jnp.asarray(layer).astype(jnp.uint32)

    def fold(carry, first, n):  # carry folded with this layer's cache columns first .. first + n - 1
        at = (layer, zero, zero, jnp.asarray(first).astype(jnp.uint32), zero)  # unsigned: jax wraps no negatives
        keys, vals = (jax.lax.dynamic_slice(a, at, (1, b, kh, n, dh))[0] for a in (k_cache, v_cache))
        ok = first + jnp.arange(n) < length[:, None]  # [B, n]
        s = jnp.where(ok[:, None, None, :], _scores(q, keys) * scale, NEG_INF)  # [B, K, G, n]
        return _fold(carry, s, vals)

    # [B, K, G]; a reduction, not a dot: XLA compiles one kernel for every layer's, not one per layer
    own = jnp.sum(q.astype(F32) * k[:, 0, :, None, :].astype(F32), -1) * scale
    carry = (own, jnp.ones_like(own), jnp.broadcast_to(v[:, 0, :, None, :].astype(F32), q.shape))  # its own column
    if blocks is None or s_max % DECODE_BLOCK:
        carry = fold(carry, 0, s_max)
    else:
        carry = jax.lax.fori_loop(0, blocks, lambda j, c: fold(c, j * DECODE_BLOCK, DECODE_BLOCK), carry)
    _, denom, acc = carry
    return (acc / denom[..., None]).reshape(b, 1, h, dh).astype(v_cache.dtype)


def block(cfg: ModelConfig, p: dict, x, positions, attend, capture: frozenset[str], edit=None, edit_kind=None):
    """One decoder layer. x [B, S, D], positions [B, S].

    `attend(q, k, v) -> (out [B, S, H, Dh], ys)` supplies attention; ys is whatever the phase keeps
    per layer (its new keys and values). Returns (x_out, ys, {kind: [B, S, width]}) for the block kinds in
    `capture` (hooks.py defines them). Every kind is a value the layer computes anyway (per-head ones are
    flattened views), and only the captured ones leave the layer, so an unrequested kind costs nothing.
    `edit(value) -> value` replaces the value of kind `edit_kind` (hooks.Edit) before anything reads it.
    """
    b, s, _ = x.shape

    def put(kind, value):
        return edit(value) if kind == edit_kind else value

    x = put("resid_pre", x)
    acts = {"resid_pre": x}
    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    acts["q"] = linear(h, p["q_w"], p["q_b"])  # [B, S, H*Dh], before RoPE
    acts["k"] = linear(h, p["k_w"], p["k_b"])  # [B, S, K*Dh]
    acts["v"] = linear(h, p["v_w"], p["v_b"])
    q = rope(acts["q"].reshape(b, s, cfg.n_heads, cfg.head_dim), positions, cfg.rope_theta)
    k = rope(acts["k"].reshape(b, s, cfg.n_kv_heads, cfg.head_dim), positions, cfg.rope_theta)
    attn, ys = attend(q, k, acts["v"].reshape(b, s, cfg.n_kv_heads, cfg.head_dim))  # [B, S, H, Dh]
    acts["z"] = attn.reshape(b, s, -1)  # [B, S, H*Dh]
    acts["attn_out"] = put("attn_out", linear(acts["z"], p["o_w"]))  # no o_proj bias
    x = acts["resid_mid"] = put("resid_mid", x + acts["attn_out"])
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    acts["mlp_pre"] = linear(h, p["gate_w"])  # [B, S, F]
    acts["mlp_pre_linear"] = linear(h, p["up_w"])
    acts["mlp_post"] = jax.nn.silu(acts["mlp_pre"]) * acts["mlp_pre_linear"]
    acts["mlp_out"] = put("mlp_out", linear(acts["mlp_post"], p["down_w"]))
    x = acts["resid_post"] = put("resid_post", x + acts["mlp_out"])
    return x, ys, {k: a for k, a in acts.items() if k in capture}


def outer_acts(cfg: ModelConfig, hooks: tuple[Hook, ...], embedded, final) -> dict:
    """The hooks outside the blocks: hook_embed (`embedded`, the embeddings entering block 0) and
    ln_final.hook_normalized (`final` [B, S, D], the last block's output, normalised without the weight)."""
    acts = {}
    for h in hooks:
        if h.kind == "embed":
            acts[h.name] = embedded
        elif h.kind == "ln_final":
            if h.layer != cfg.n_layers:  # a truncated model (prefill-only) must not pass for the full one
                raise HookError(f"{h.name} is after layer {h.layer - 1}, but this forward pass runs {cfg.n_layers}")
            acts[h.name] = rms_normalize(final, cfg.rms_norm_eps).astype(final.dtype)
    return acts


def scan_layers(
    cfg: ModelConfig, params, x, positions, attend, hooks: tuple[Hook, ...], per_layer=None, edit=None, edit_params=None
):
    """All layers as one `lax.scan` over the stacked weights: XLA compiles one layer body.

    `attend(q, k, v, layer_inputs) -> (out, ys)`; `per_layer` is a pytree with a leading layer axis
    (e.g. the cache each layer reads), sliced per layer. Hooked activations are written from inside
    the scan into one [n_hooked + 1, ...] buffer per kind; un-hooked layers write the spare last slot.
    Returns (x [B, S, D] before the final norm, ys stacked [L, ...], {hook name: [B, S, width]}).
    edit (hooks.Edit, static) with edit_params: its layer takes the edited branch of a `lax.cond`.
    With cfg.n_layers == 0 (a prefill-only run capturing hook_embed alone) nothing runs and ys is None.
    """
    n_layers = cfg.n_layers
    if n_layers == 0:
        return x, None, outer_acts(cfg, hooks, x, x)
    embedded = x
    block_hooks = tuple(h for h in hooks if h.is_block)
    kinds = sorted({h.kind for h in block_hooks})
    layers_of = {kind: sorted(h.layer for h in block_hooks if h.kind == kind) for kind in kinds}
    slot = {kind: np.full(n_layers, len(ls), np.int32) for kind, ls in layers_of.items()}  # [L]
    for kind, ls in layers_of.items():
        slot[kind][ls] = np.arange(len(ls))
    width = {kind: Hook(0, kind).width(cfg) for kind in kinds}
    bufs = {kind: jnp.zeros((len(layers_of[kind]) + 1, *x.shape[:-1], width[kind]), x.dtype) for kind in kinds}

    def body(carry, xs):
        x, bufs = carry
        lp, inputs, where, layer = xs
        fn = None if edit is None else _edit_at(edit, edit_params, layer == edit.hook.layer)
        kind = None if edit is None else edit.hook.kind
        x, ys, acts = block(cfg, lp, x, positions, lambda q, k, v: attend(q, k, v, inputs), frozenset(kinds), fn, kind)
        bufs = {kind: jax.lax.dynamic_update_index_in_dim(bufs[kind], acts[kind], where[kind], 0) for kind in kinds}
        return (x, bufs), ys

    xs = (stacked(params), per_layer, {kind: jnp.asarray(s) for kind, s in slot.items()}, jnp.arange(n_layers))
    (x, bufs), ys = jax.lax.scan(body, (x, bufs), xs)
    acts = {h.name: bufs[h.kind][int(slot[h.kind][h.layer])] for h in block_hooks}
    return x, ys, acts | outer_acts(cfg, hooks, embedded, x)


def _edit_at(edit, edit_params, here):
    """The edit as a function of a value, applied only where `here` (a traced bool) holds."""

    def fn(value):
        return jax.lax.cond(here, lambda v: edit.fn(edit_params, v).astype(v.dtype), lambda v: v, value)

    return fn


def unrolled_layers(
    cfg: ModelConfig, params, x, positions, attend, hooks: tuple[Hook, ...], edit=None, edit_params=None
):
    """All layers as straight-line code, for decode: a scanned layer copies its weights out of the stack
    every step (XLA:CPU does not alias the slice), +50% per decode step at 0.5B.
    `attend(layer, q, k, v) -> (out, ys)`. Returns (x, (ys per layer, ...), {hook name: [B, S, width]})."""
    wanted = kinds_by_layer(hooks)
    embedded, ys_all, acts = x, [], {}
    for i, lp in enumerate(params["layers"]):
        here = edit is not None and edit.hook.layer == i
        fn = (lambda v: edit.fn(edit_params, v).astype(v.dtype)) if here else None
        x, ys, layer_acts = block(
            cfg, lp, x, positions, functools.partial(attend, i), wanted.get(i, frozenset()), fn, here and edit.hook.kind
        )
        ys_all.append(ys)
        acts |= {Hook(i, kind).name: a for kind, a in layer_acts.items()}
    return x, tuple(ys_all), acts | outer_acts(cfg, hooks, embedded, x)


def embed(params, tokens):
    return jnp.take(params["embed"], tokens, axis=0)  # [B, S, D]


def logits(cfg: ModelConfig, params, h):
    """h [..., D] (pre final norm) -> float32 logits [..., V]."""
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    return jnp.einsum("...d,vd->...v", h, head, preferred_element_type=F32)
