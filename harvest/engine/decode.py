"""Decode: the whole generation loop in one jitted `lax.while_loop`.

Cache layout (B rows, prompt bucket P, T = max_new_tokens, S_max = P + T):

    columns  0 .. len_b-1    | len_b .. P-1      | P .. P+T-1
             row b's prompt  | padding (masked)  | generated tokens, step t at column P + t

Every row writes step t at the same column P + t (one dynamic_update_slice, not a scatter),
while its RoPE position is len_b + t. Step t samples token g_t from the current logits, then
runs g_t through the model: that forward pass gives g_t's activations (captured at index t)
and the logits for step t + 1. So every generated token, the stop token included, has
activations. Rows that have stopped keep computing (static shapes) but record nothing.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from harvest.engine import model
from harvest.engine.config import ModelConfig
from harvest.engine.hooks import Hook
from harvest.engine.sampling import SamplingConfig, sample
from harvest.engine.stopping import STOP_EOS, STOP_LENGTH, STOP_NONE, STOP_STRING


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int
    sampling: SamplingConfig = SamplingConfig()
    fixed_length: bool = False  # generate exactly max_new_tokens: EOS and stop strings are ignored
    hooks: tuple[Hook, ...] = ()  # captured at every step


def _step_valid(lengths, prompt_len: int, cache_len: int, step):
    """[B, S_max] bool: row b's prompt columns, and generated columns up to this step."""
    col = jnp.arange(cache_len)[None, :]
    return (col < lengths[:, None]) | ((col >= prompt_len) & (col <= prompt_len + step))


def decode_one(cfg: ModelConfig, hooks, params, cache, tokens, lengths, prompt_len: int, step):
    """Run one token per row. tokens [B] -> (cache, logits [B, V], acts {name: [B, width]})."""
    cache_len = cache[0][0].shape[1]
    positions = (lengths + step)[:, None]  # [B, 1]
    valid = _step_valid(lengths, prompt_len, cache_len, step)
    x = model.embed(params, tokens[:, None])  # [B, 1, D]

    def attend(layer, q, k, v):
        kc, vc = cache[layer]
        kc = jax.lax.dynamic_update_slice(kc, k, (0, prompt_len + step, 0, 0))
        vc = jax.lax.dynamic_update_slice(vc, v, (0, prompt_len + step, 0, 0))
        return model.cached_attention(q, kc, vc, valid), (kc, vc)

    x, new_cache, acts = model.decoder(cfg, params, x, positions, attend, hooks)
    return new_cache, model.logits(cfg, params, x[:, 0]), {n: a[:, 0] for n, a in acts.items()}


@functools.partial(jax.jit, static_argnames=("cfg", "dcfg", "prompt_len"), donate_argnames=("cache",))
def decode(
    cfg: ModelConfig,
    dcfg: DecodeConfig,
    params,
    cache,
    logits,
    lengths,
    active,
    keys,
    is_eos,
    stop_table,
    stop_lengths,
    *,
    prompt_len: int,
):
    """Generate up to T tokens per row.

    cache: from prefill, S_max = prompt_len + T; logits [B, V] at each row's last prompt token;
    lengths [B]; active [B] bool (False for filler rows, which start stopped); keys [B] per-row RNG;
    is_eos [V] bool; stop_table [N, M+1, V] int16 or None; stop_lengths [N] or None.
    Returns dict: tokens [B, T] int32, num_generated [B], stop_reason [B] (stopping.STOP_*),
    logprob [B] (sum of the model's log-probabilities of the generated tokens, before temperature),
    acts {name: [B, T, width]}.
    """
    b = logits.shape[0]
    t_max = dcfg.max_new_tokens
    widths = {h.name: h.width(cfg) for h in dcfg.hooks}
    dtype = params["embed"].dtype
    n_stop = 0 if stop_table is None else stop_table.shape[0]
    state = dict(
        step=jnp.int32(0),
        cache=cache,
        logits=logits,
        tokens=jnp.zeros((b, t_max), jnp.int32),
        done=~active,
        num_generated=jnp.zeros((b,), jnp.int32),
        stop_reason=jnp.full((b,), STOP_NONE, jnp.int32),
        stop_state=jnp.zeros((b, n_stop), jnp.int16),
        logprob=jnp.zeros((b,), jnp.float32),
        acts={name: jnp.zeros((b, t_max, w), dtype) for name, w in widths.items()},
    )

    def cond(s):
        return (s["step"] < t_max) & ~jnp.all(s["done"])

    def body(s):
        t = s["step"]
        active = ~s["done"]
        tok = jnp.where(active, sample(dcfg.sampling, s["logits"], keys, t), 0)  # [B]
        lp = jnp.take_along_axis(s["logits"], tok[:, None], -1)[:, 0] - jax.nn.logsumexp(s["logits"], -1)
        hit_eos = is_eos[tok] & active
        if n_stop:
            stop_state = stop_table[jnp.arange(n_stop)[None, :], s["stop_state"], tok[:, None]]  # [B, N]
            hit_string = jnp.any(stop_state == stop_lengths[None, :], axis=-1) & active
        else:
            stop_state, hit_string = s["stop_state"], jnp.zeros_like(active)
        if dcfg.fixed_length:
            hit_eos = hit_string = jnp.zeros_like(active)
        hit_length = active & (t + 1 >= t_max)
        reason = jnp.where(
            hit_eos, STOP_EOS, jnp.where(hit_string, STOP_STRING, jnp.where(hit_length, STOP_LENGTH, s["stop_reason"]))
        )
        cache, next_logits, acts = decode_one(cfg, dcfg.hooks, params, s["cache"], tok, lengths, prompt_len, t)
        return dict(
            step=t + 1,
            cache=cache,
            logits=next_logits,
            tokens=jax.lax.dynamic_update_slice(s["tokens"], tok[:, None], (0, t)),
            done=s["done"] | hit_eos | hit_string | hit_length,
            num_generated=s["num_generated"] + active.astype(jnp.int32),
            stop_reason=reason,
            stop_state=stop_state,
            logprob=s["logprob"] + jnp.where(active, lp, 0.0),
            acts={
                n: jax.lax.dynamic_update_slice(s["acts"][n], acts[n][:, None].astype(dtype), (0, t, 0)) for n in widths
            },
        )

    out = jax.lax.while_loop(cond, body, state)
    # The cache is returned only so XLA can alias it to the donated input (an in-place loop).
    return {k: out[k] for k in ("tokens", "num_generated", "stop_reason", "logprob", "acts", "cache")}
