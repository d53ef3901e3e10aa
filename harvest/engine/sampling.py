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
        return jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)
    if cfg.top_k:
        vals, idx = jax.lax.top_k(logits, cfg.top_k)  # [B, k], sorted
    else:  # top-p over the whole vocabulary needs it sorted
        idx = jnp.argsort(-logits, axis=-1)  # [B, V]
        vals = jnp.take_along_axis(logits, idx, axis=-1)
    if cfg.top_p < 1.0:
        probs = jax.nn.softmax(vals, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass ranked above
        vals = jnp.where(before < cfg.top_p, vals, -jnp.inf)  # keeps >= 1 token
    choice = jax.vmap(jax.random.categorical)(step_keys, vals)  # [B]
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
