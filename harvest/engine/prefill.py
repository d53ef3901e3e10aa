"""Chunked prefill: prompts enter their decode slots C tokens at a time.

One compiled program serves every prompt length: a call takes R lanes of one chunk each, attends
to the chunk (causally) and to the lane's slot cache written by its earlier chunks, and writes the
chunk's keys and values into that cache. Padding costs under one chunk per prompt, and memory is
bounded by R x C whatever the prompt length. When a lane carries a prompt's final chunk, its slot
is armed for decoding: the logits at the last real token, the length, a fresh RNG key and stop state.

`forward` is the plain full-sequence pass (one chunk from position 0, no cache), the reference that
cached decode is tested against and the entry point for scoring whole sequences.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from harvest.engine import model
from harvest.engine.config import ModelConfig
from harvest.engine.hooks import Edit, Hook
from harvest.engine.sampling import row_keys
from harvest.engine.sharding import constrain_rows, constrain_state
from harvest.engine.state import PrefillChunk, SlotState, write_columns
from harvest.engine.stopping import STOP_NONE


@functools.partial(jax.jit, static_argnames=("cfg", "hooks", "arm", "edit"), donate_argnames=("state",))
def prefill_chunk(
    cfg: ModelConfig,
    hooks: tuple[Hook, ...],
    params,
    state: SlotState,
    chunk: PrefillChunk,
    arm: bool = True,
    edit: Edit | None = None,
    edit_params=None,
):
    """-> (state with the chunk in its slots' caches, {hook name: [R, C, width]} activations).

    arm=False (prefill-only runs) skips the LM head and leaves the slots unarmed: nothing decodes.
    cfg.n_layers may be below the checkpoint's (params["layers"] then holds only those layers), down to 0
    (hook_embed alone: no layer runs and there is no cache)."""
    r, c = chunk.tokens.shape
    rows = jnp.minimum(chunk.slot, state.num_slots - 1)  # idle lanes read some slot; their writes drop
    positions = chunk.start[:, None] + jnp.arange(c, dtype=jnp.int32)  # [R, C]
    x = model.embed(params, chunk.tokens)  # [R, C, D]
    prior = tuple(a[:, rows] for a in state.cache) or None  # (k, v) [L, R, K, S_max, Dh]

    def attend(q, k, v, layer_prior):
        pk, pv = layer_prior
        return model.chunk_attention(q, k, v, pk, pv, chunk.start, c), (k, v)

    x, ys, acts = model.scan_layers(cfg, params, x, positions, attend, hooks, prior, edit, edit_params)
    new = tuple(a.transpose(1, 2, 0, 3, 4) for a in ys or ())  # ys: (k, v) [L, R, C, K, Dh] -> [R, C, L, K, Dh]
    cache = write_columns(state.cache, chunk.slot[:, None], positions, new)
    if not arm:
        return constrain_state(dataclasses.replace(state, cache=cache)), constrain_rows(acts)
    last_x = jnp.take_along_axis(x, jnp.maximum(chunk.n_valid - 1, 0)[:, None, None], axis=1)[:, 0]  # [R, D]
    armed = jnp.where(chunk.last, chunk.slot, state.num_slots)  # lanes that finish their prompt now
    logits = model.logits(cfg, params, last_x)  # [R, V]
    keys = row_keys(chunk.seed, chunk.sequence_id)  # [R]
    state = arm_slots(dataclasses.replace(state, cache=cache), armed, logits, chunk.start + chunk.n_valid, keys)
    return constrain_state(state), constrain_rows(acts)


def arm_slots(state: SlotState, slots, logits, length, keys) -> SlotState:
    """Slots [R] (N: dropped) start decoding: their next-token logits [R, V], cache length [R] and the
    occupant's RNG key [R]; nothing generated yet."""
    n_stop = state.stop_state.shape[1]
    r = slots.shape[0]
    return dataclasses.replace(
        state,
        logits=state.logits.at[slots].set(logits, mode="drop"),
        prompt_logits=state.prompt_logits.at[slots].set(logits, mode="drop"),
        length=state.length.at[slots].set(length, mode="drop"),
        num_generated=state.num_generated.at[slots].set(0, mode="drop"),
        active=state.active.at[slots].set(True, mode="drop"),
        keys=state.keys.at[slots].set(keys, mode="drop"),
        stop_state=state.stop_state.at[slots].set(jnp.zeros((r, n_stop), jnp.int16), mode="drop"),
        stop_reason=state.stop_reason.at[slots].set(STOP_NONE, mode="drop"),
        logprob=state.logprob.at[slots].set(0.0, mode="drop"),
    )


@functools.partial(jax.jit, static_argnames=("seed",), donate_argnames=("state",))
def fork(state: SlotState, source, target, whole, prompt_length, sequence_ids, seed: int) -> SlotState:
    """Shared prompt prefixes: each target slot [M] (N: none) gets a copy of its source slot's KV cache,
    so its prompt continues from the source's columns instead of recomputing them. Only the columns
    below the target's length are ever read (attention masks the rest, and decode overwrites a column
    before reading it), so whole rows are copied: one static shape. whole [M]: the prompts are
    identical (prompt_length [M] tokens), so the target is armed at once, with its own RNG key, from the
    source's prompt-end logits, which stay while the source decodes. Unused rows: target = N (their
    writes drop), any valid source."""
    cache = tuple(a.at[:, target].set(a[:, source], mode="drop") for a in state.cache)  # [L, N, K, S_max, Dh]
    state = dataclasses.replace(state, cache=cache)
    armed = jnp.where(whole, target, state.num_slots)
    state = arm_slots(state, armed, state.prompt_logits[source], prompt_length, row_keys(seed, sequence_ids))
    return constrain_state(state)


@functools.partial(jax.jit, static_argnames=("cfg", "hooks", "edit"))
def forward(
    cfg: ModelConfig, params, tokens, *, hooks: tuple[Hook, ...] = (), edit: Edit | None = None, edit_params=None
):
    """tokens [B, S] -> (x [B, S, D] before the final norm, {hook name: [B, S, width]}).

    Causal masking alone keeps right padding out of every real token's view. `model.logits(cfg,
    params, x)` gives the logits (B x S x V floats: mind the size). `edit` (hooks.Edit) with
    `edit_params` replaces one hook's value on the way (the spliced model)."""
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))

    def attend(q, k, v, _):
        return model.chunk_attention(q, k, v, None, None, None, s), None

    x, _, acts = model.scan_layers(
        cfg, params, model.embed(params, tokens), positions, attend, hooks, None, edit, edit_params
    )
    return x, acts
