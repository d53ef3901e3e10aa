"""Token choice: greedy, temperature, top-k, top-p, with a per-row RNG stream.

Each row owns a key derived from its sequence id (not its batch slot) and folds in the step, so
a sequence samples the same tokens whatever batch it lands in.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from harvest.errors import FieldError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0  # 1 means off

    def __post_init__(self):
        if self.temperature < 0:
            raise FieldError("temperature", f"{self.temperature:g} is impossible; it must be >= 0")
        if self.top_k < 0:
            raise FieldError("top_k", f"{self.top_k} is impossible; it must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise FieldError("top_p", f"{self.top_p:g} is impossible; it must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def row_keys(seed: int, sequence_ids) -> jax.Array:
    """One key per row from the run seed and each row's sequence id. [B] keys."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(sequence_ids, jnp.uint32))


def sample(cfg: SamplingConfig, logits, keys, step):
    """logits [B, V] float32, keys [B], step (scalar or [B]: each row's token index) -> tokens [B] int32.

    Order as in transformers: temperature, then top-k, then top-p (on the k survivors only, so
    we sort k candidates rather than the vocabulary).
    """
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    step_keys = jax.vmap(jax.random.fold_in)(keys, jnp.broadcast_to(step, keys.shape))
    if not cfg.top_k and cfg.top_p == 1.0:  # plain temperature sampling: no ranking needed
        return draw(logits, step_keys)
    if cfg.top_k:
        vals, idx = jax.lax.top_k(logits, cfg.top_k)  # [B, k], sorted
    else:  # top-p over the whole vocabulary needs it sorted
        idx = jnp.argsort(-logits, axis=-1)  # [B, V]
        vals = jnp.take_along_axis(logits, idx, axis=-1)
    if cfg.top_p < 1.0:
        probs = jax.nn.softmax(vals, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass ranked above
        vals = jnp.where(before < cfg.top_p, vals, -jnp.inf)  # keeps >= 1 token
    choice = draw(vals, step_keys)  # [B]
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


DRAW_BLOCK = 1024  # vocabulary entries per block of the two-level draw


def draw(logits, keys):
    """One index per row from softmax(logits) [B, V] (-inf entries are never drawn), by inverse CDF in
    two levels: a block of DRAW_BLOCK entries by the blocks' masses, then an entry of that block. Two
    uniforms per row instead of one Gumbel per entry (jax.random.categorical): at V = 152k on a CPU,
    25 ms instead of 240 ms for 32 rows, a third of a decode step. -> [B] int32."""
    b, v = logits.shape
    size = min(DRAW_BLOCK, v)
    p = jnp.exp(logits - logits.max(-1, keepdims=True))  # [B, V], the largest is 1
    p = jnp.pad(p, ((0, 0), (0, -v % size))).reshape(b, -1, size)  # [B, blocks, size]
    u = jax.vmap(lambda k: jax.random.uniform(k, (2,)))(keys)  # [B, 2] in [0, 1)
    block = _inverse_cdf(p.sum(-1), u[:, 0])  # [B]
    inner = jnp.take_along_axis(p, block[:, None, None], axis=1)[:, 0]  # [B, size]
    return (block * size + _inverse_cdf(inner, u[:, 1])).astype(jnp.int32)


def _inverse_cdf(weights, u):
    """Per row, the first index whose running sum of weights [B, n] (>= 0, one positive) exceeds u [B]
    times the total: always a positive weight, even at u = 0 or when rounding puts u x total past
    the last running sum."""
    running = jnp.cumsum(weights, axis=-1)  # [B, n]
    i = jnp.sum(running <= u[:, None] * running[:, -1:], axis=-1)  # [B]
    last_positive = weights.shape[-1] - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)
    return jnp.minimum(i, last_positive)
