"""The engine's device state, as typed pytrees (after gemma's `SamplingState`).

Continuous batching keeps a pool of N decode slots. Each slot holds one sequence at a time: its KV
cache row, its next-token logits, where it is and whether it has stopped. Prefill writes a prompt
straight into a free slot's cache; decode advances every live slot; the host reads a finished
slot's outputs and hands the slot to the next prompt. Nothing of a previous occupant is ever
visible to the next one: attention only reads cache columns below the slot's own length.

Cache layout: one key and one value array for all layers, [L, N, K, S_max, Dh], so a phase writes every
layer's columns in one scatter (a kernel per scatter is what XLA:CPU spends its compile time on). Per layer
and slot (S_max = the longest prompt rounded up to the prefill chunk, plus T;
on a CPU rounded up to whole blocks of the bounded decode attention, model.DECODE_BLOCK):

    columns  0 .. n-1         | n .. n+t-1                  | beyond
             the prompt       | generated tokens 0..t-1     | stale (masked: never read)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from harvest.engine.config import ModelConfig
from harvest.engine.hooks import Hook
from harvest.engine.stopping import STOP_NONE

Cache = tuple[jax.Array, jax.Array] | tuple[()]  # (k, v), each [L, N, K, S_max, Dh]; () with no layers


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    """The decode pool: N slots. Carried through prefill and decode jits, donated each call."""

    cache: Cache
    logits: jax.Array  # [N, V] float32: the next token's logits
    prompt_logits: jax.Array  # [N, V] float32: the logits at the prompt's end, kept while it decodes (prefill.fork)
    length: jax.Array  # [N] int32: tokens in the slot's cache; the next token's column and position
    num_generated: jax.Array  # [N] int32: also the index of the next generated token
    active: jax.Array  # [N] bool: generating (False: free, or finished and waiting to be read)
    keys: jax.Array  # [N] RNG keys of the occupant (from its sequence id, never the slot)
    stop_state: jax.Array  # [N, n_stop_strings] int16: stop-string automaton states
    stop_reason: jax.Array  # [N] int32, stopping.STOP_*
    logprob: jax.Array  # [N] float32: sum of the generated tokens' log-probabilities
    tokens: jax.Array  # [N, T] int32: generated ids
    acts: dict[str, jax.Array]  # hook name -> [N, T, width]: decode activations

    @property
    def num_slots(self) -> int:
        return self.length.shape[0]


def empty_state(
    cfg: ModelConfig, num_slots: int, cache_len: int, max_new_tokens: int, hooks: tuple[Hook, ...], n_stop: int, dtype
) -> SlotState:
    n = num_slots
    kv = (cfg.n_layers, n, cfg.n_kv_heads, cache_len, cfg.head_dim)  # heads before columns: [K, S, Dh] blocks
    return SlotState(
        cache=(jnp.zeros(kv, dtype), jnp.zeros(kv, dtype)) if cfg.n_layers else (),
        logits=jnp.zeros((n, cfg.vocab_size), jnp.float32),
        prompt_logits=jnp.zeros((n, cfg.vocab_size), jnp.float32),
        length=jnp.zeros((n,), jnp.int32),
        num_generated=jnp.zeros((n,), jnp.int32),
        active=jnp.zeros((n,), bool),
        keys=jax.random.split(jax.random.key(0), n),
        stop_state=jnp.zeros((n, n_stop), jnp.int16),
        stop_reason=jnp.full((n,), STOP_NONE, jnp.int32),
        logprob=jnp.zeros((n,), jnp.float32),
        tokens=jnp.zeros((n, max_new_tokens), jnp.int32),
        acts={h.name: jnp.zeros((n, max_new_tokens, h.width(cfg)), dtype) for h in hooks},
    )


def write_columns(cache: Cache, slots, cols, new: tuple) -> Cache:
    """Every layer's keys and values into their cache columns, one scatter per array. slots and cols
    broadcast to one index shape I (slot N or column S_max: the write drops); new: (k, v), each [*I, L, K, Dh]."""
    return tuple(a.at[:, slots, :, cols].set(u, mode="drop") for a, u in zip(cache, new))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    """One prefill call: R lanes, each one chunk of one prompt. An idle lane has slot = N (its writes
    are dropped) and n_valid = 0."""

    slot: jax.Array  # [R] int32: the decode slot the prompt owns
    tokens: jax.Array  # [R, C] int32: the chunk, right-padded
    start: jax.Array  # [R] int32: the chunk's first position, a multiple of C
    n_valid: jax.Array  # [R] int32: real tokens in the chunk
    last: jax.Array  # [R] bool: the prompt's final chunk: the slot starts decoding after this call
    sequence_id: jax.Array  # [R] uint32: with the seed, the RNG key of each prompt's sequence (sampling.row_keys)
    seed: jax.Array  # [] uint32: the run's seed; both traced, so the keys cost no program of their own


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StopTables:
    """The stop rules as device arrays (stopping.StopRules.tables)."""

    is_eos: jax.Array  # [V] bool
    transitions: jax.Array | None  # [n_stop_strings, max_len + 1, V] int16
    lengths: jax.Array | None  # [n_stop_strings] int16

    @property
    def num_strings(self) -> int:
        return 0 if self.transitions is None else self.transitions.shape[0]
