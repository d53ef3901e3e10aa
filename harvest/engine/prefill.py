"""Prefill: run right-padded prompts through the model once and fill a fixed-size KV cache.

Rows are right-padded to a shared bucket length P, so every row's positions are 0..P-1 and
padding only ever sits *after* a row's real tokens: causal masking alone keeps it out of every
real token's view. Padding keys land in cache columns [len_b, P), which decode masks out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from harvest.engine import model
from harvest.engine.config import ModelConfig
from harvest.engine.hooks import Hook

Cache = tuple[tuple[jax.Array, jax.Array], ...]  # per layer (k, v), each [B, S_max, K, Dh]


def attention_chunk(p: int, max_chunk: int) -> int:
    """The block size for a bucket: the whole prompt if short, else the largest power-of-two
    divisor of P that is <= max_chunk (GenerateConfig keeps long buckets multiples of 128)."""
    if p <= max_chunk:
        return p
    c = max_chunk
    while p % c:
        c //= 2
    return c


@functools.partial(jax.jit, static_argnames=("cfg", "hooks", "cache_len", "max_chunk"))
def prefill(
    cfg: ModelConfig, params, tokens, lengths, *, hooks: tuple[Hook, ...], cache_len: int, max_chunk: int = 512
):
    """tokens [B, P] int32 (right-padded), lengths [B] int32 (>= 1).

    Returns (cache, last_logits [B, V] float32, acts {hook name: [B, P, width]}).
    Logits are computed only at each row's last real token: full prefill logits would cost
    B*P*V floats (about 20 GB for 64 x 512 tokens).
    """
    b, p = tokens.shape
    chunk = attention_chunk(p, max_chunk)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))  # [B, P]
    x = model.embed(params, tokens)  # [B, P, D]
    empty = jnp.zeros((b, cache_len, cfg.n_kv_heads, cfg.head_dim), x.dtype)  # [B, S_max, K, Dh]

    def attend(layer, q, k, v):
        kc = jax.lax.dynamic_update_slice(empty, k, (0, 0, 0, 0))
        vc = jax.lax.dynamic_update_slice(empty, v, (0, 0, 0, 0))
        return model.causal_attention(q, k, v, chunk), (kc, vc)

    x, cache, acts = model.decoder(cfg, params, x, positions, attend, hooks)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
    return cache, model.logits(cfg, params, last), acts
