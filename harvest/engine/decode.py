"""Decode: every live slot of the pool advances one token per step, in jitted segments.

Step for a live slot with t tokens generated: sample token g_t from its logits (RNG folded with t),
run g_t through the model at the slot's own position (= its column in the cache), which gives g_t's
activations (stored at index t) and the logits for t + 1. So every generated token, the stop token
included, has activations. Free and finished slots keep computing (static shapes) but every write
of theirs goes to an out-of-range index and is dropped.

A segment is a `while_loop` of at most `max_steps` steps that also exits as soon as `want_free`
slots are free, so the host can refill them with prefilled prompts.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from harvest.engine import model
from harvest.engine.config import ModelConfig
from harvest.engine.hooks import Edit, Hook
from harvest.engine.sampling import SamplingConfig, sample
from harvest.engine.sharding import constrain_state
from harvest.engine.state import SlotState, StopTables, write_columns
from harvest.engine.stopping import STOP_EOS, STOP_LENGTH, STOP_STRING


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int
    sampling: SamplingConfig = SamplingConfig()
    fixed_length: bool = False  # generate exactly max_new_tokens: EOS and stop strings are ignored
    hooks: tuple[Hook, ...] = ()  # captured at every step
    edit: Edit | None = None  # a hook's value replaced by edit.fn(edit_params, x) (the spliced model)


def stop_check(dcfg: DecodeConfig, s: SlotState, tables: StopTables, tok):
    """-> (stopped [N] bool, stop_reason [N], stop_state) after live slots emit `tok`."""
    live = s.active
    hit_eos = tables.is_eos[tok] & live
    if tables.num_strings:
        n = tables.num_strings
        stop_state = tables.transitions[jnp.arange(n)[None, :], s.stop_state, tok[:, None]]  # [N, n]
        hit_string = jnp.any(stop_state == tables.lengths[None, :], axis=-1) & live
    else:
        stop_state, hit_string = s.stop_state, jnp.zeros_like(live)
    if dcfg.fixed_length:
        hit_eos = hit_string = jnp.zeros_like(live)
    hit_length = live & (s.num_generated + 1 >= dcfg.max_new_tokens)
    reason = jnp.where(
        hit_eos, STOP_EOS, jnp.where(hit_string, STOP_STRING, jnp.where(hit_length, STOP_LENGTH, s.stop_reason))
    )
    return hit_eos | hit_string | hit_length, reason, stop_state


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NewColumns:
    """One step's keys and values, every layer's, for the cache column each row goes to (the cache's
    length: out of range, dropped). A step reads the cache and leaves these for the next step to write
    before its own reads: an in-place write after the reads would make XLA copy the whole cache, and one
    write for all layers is one scatter kernel to compile instead of one per layer."""

    col: jax.Array  # [N] int32
    k: jax.Array  # [N, L, K, Dh]
    v: jax.Array  # [N, L, K, Dh]

    @staticmethod
    def none(cache) -> NewColumns:
        layers, n, kh, s_max, dh = cache[0].shape
        zeros = jnp.zeros((n, layers, kh, dh), cache[0].dtype)
        return NewColumns(jnp.full((n,), s_max, jnp.int32), zeros, zeros)

    def write(self, cache):
        return write_columns(cache, jnp.arange(self.col.shape[0]), self.col, (self.k, self.v))


def decode_step(
    cfg: ModelConfig, dcfg: DecodeConfig, params, s: SlotState, tables: StopTables, edit_params=None
) -> tuple[SlotState, NewColumns]:
    """-> (the state one token on, with that token's keys and values not yet in the cache: NewColumns)."""
    n, t_max = s.tokens.shape
    live = s.active
    rows = jnp.arange(n)
    tok = jnp.where(live, sample(dcfg.sampling, s.logits, s.keys, s.num_generated), 0)  # [N]
    lp = jnp.take_along_axis(s.logits, tok[:, None], -1)[:, 0] - jax.nn.logsumexp(s.logits, -1)
    stopped, reason, stop_state = stop_check(dcfg, s, tables, tok)

    # a row attends to columns [0, length) and to tok itself; on a CPU only the blocks up to the longest
    # live row are read
    blocks = model.decode_blocks(jnp.max(jnp.where(live, s.length, 0))) if model.bounded_decode_attention() else None
    k_cache, v_cache = s.cache  # [L, N, K, S_max, Dh]

    def attend(i, q, k, v):
        layer = jax.lax.optimization_barrier(jnp.uint32(i))  # traced: every layer shares one compiled loop
        return model.cached_attention(q, k, v, k_cache, v_cache, layer, s.length, blocks), (k[:, 0], v[:, 0])

    x = model.embed(params, tok[:, None])  # [N, 1, D]
    x, kv, acts = model.unrolled_layers(cfg, params, x, s.length[:, None], attend, dcfg.hooks, dcfg.edit, edit_params)
    new = NewColumns(
        jnp.where(live, s.length, k_cache.shape[3]),  # dead slots write out of range (dropped)
        *(jnp.stack([layer[j] for layer in kv], axis=1) for j in (0, 1)),  # [N, L, K, Dh]
    )
    at = jnp.where(live, s.num_generated, t_max)  # [N]; dead slots: dropped
    grow = live.astype(jnp.int32)
    state = SlotState(
        cache=s.cache,
        logits=model.logits(cfg, params, x[:, 0]),
        prompt_logits=s.prompt_logits,
        length=s.length + grow,
        num_generated=s.num_generated + grow,
        active=live & ~stopped,
        keys=s.keys,
        stop_state=stop_state,
        stop_reason=reason,
        logprob=s.logprob + jnp.where(live, lp, 0.0),
        tokens=s.tokens.at[rows, at].set(tok, mode="drop"),
        acts={k: a.at[rows, at].set(acts[k][:, 0].astype(a.dtype), mode="drop") for k, a in s.acts.items()},
    )
    return state, new


@functools.partial(jax.jit, static_argnames=("cfg", "dcfg"), donate_argnames=("state",))
def decode_segment(
    cfg: ModelConfig,
    dcfg: DecodeConfig,
    params,
    state: SlotState,
    tables: StopTables,
    max_steps,
    want_free,
    edit_params=None,
) -> tuple[SlotState, jax.Array]:
    """Advance the pool until max_steps, or want_free slots are free, or no slot is live.
    -> (state, steps run). Each step first writes the previous step's new columns; the last are written
    after the loop, so the cache is whole whenever the state leaves this program."""

    def cond(c):
        i, s, _ = c
        free = jnp.sum(~s.active)
        return (i < max_steps) & (free < want_free) & jnp.any(s.active)

    def body(c):
        i, s, new = c
        s = dataclasses.replace(s, cache=new.write(s.cache))
        return i + 1, *decode_step(cfg, dcfg, params, s, tables, edit_params)

    steps, state, new = jax.lax.while_loop(cond, body, (jnp.int32(0), state, NewColumns.none(state.cache)))
    return constrain_state(dataclasses.replace(state, cache=new.write(state.cache))), steps


@jax.jit
def read_slot(state: SlotState, slot):
    """One slot's outputs: (tokens [T], {hook name: [T, width]}), copied out of the donated state."""
    return state.tokens[slot], {k: a[slot] for k, a in state.acts.items()}


@jax.jit
def compact(state: SlotState, slots, keep) -> SlotState:
    """A smaller pool holding `slots` [n] of `state` (keep [n] False: an empty slot). When no prompt
    waits and few rows are live, a step of the small pool costs half that of the full one on a CPU."""
    small = jax.tree.map(lambda a: a[slots], dataclasses.replace(state, cache=()))
    cache = tuple(a[:, slots] for a in state.cache)  # [L, n, K, S_max, Dh]
    return constrain_state(dataclasses.replace(small, cache=cache, active=small.active & keep))
