"""Token choice draws from the distribution transformers defines: temperature, then top-k, then top-p."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harvest.engine.sampling import DRAW_BLOCK, SamplingConfig, draw, row_keys, sample

LOGITS = np.log(np.array([0.40, 0.25, 0.15, 0.10, 0.06, 0.04]))  # [V] probabilities at temperature 1
ROWS = 20_000


def empirical(cfg: SamplingConfig) -> np.ndarray:
    """Frequencies of each token over ROWS independent rows (one key per row, as in a batch)."""
    logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (ROWS, len(LOGITS)))  # [B, V]
    tokens = np.asarray(jax.jit(sample, static_argnums=0)(cfg, logits, row_keys(7, np.arange(ROWS)), 3))
    return np.bincount(tokens, minlength=len(LOGITS)) / ROWS


def expected(temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    p = np.exp(LOGITS / temperature)
    p /= p.sum()
    keep = np.ones_like(p, bool)
    if top_k:
        keep &= np.arange(len(p)) < top_k  # LOGITS are sorted descending
    q = np.where(keep, p, 0)
    q /= q.sum()
    if top_p < 1:
        keep &= (np.cumsum(q) - q) < top_p
    q = np.where(keep, p, 0)
    return q / q.sum()


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.7), (0.8, 4, 0.8)],
)
def test_sampled_frequencies_match_the_distribution(temperature, top_k, top_p):
    got = empirical(SamplingConfig(temperature, top_k, top_p))
    want = expected(temperature, top_k, top_p)
    assert np.abs(got - want).max() < 0.015, (got.round(3), want.round(3))
    assert (got[want == 0] == 0).all()  # truncated tokens are never drawn


def test_greedy_takes_the_argmax():
    logits = jnp.asarray(np.stack([LOGITS, LOGITS[::-1]]), jnp.float32)
    assert sample(SamplingConfig(), logits, row_keys(0, [0, 1]), 0).tolist() == [0, len(LOGITS) - 1]


def test_two_level_draw_over_a_large_vocabulary():
    """Mass spread over several blocks, the last one partial, most entries impossible (-inf or underflow):
    frequencies match, and an impossible entry (padding included) is never drawn."""
    v = 2 * DRAW_BLOCK + 300
    logits = np.full(v, -np.inf, np.float32)
    hot = {5: 0.3, DRAW_BLOCK - 1: 0.2, DRAW_BLOCK: 0.1, 2 * DRAW_BLOCK + 17: 0.25, v - 1: 0.15}
    for i, p in hot.items():
        logits[i] = np.log(p)
    logits[7] = -200.0  # underflows to zero probability after the max is subtracted
    rows = jnp.broadcast_to(jnp.asarray(logits), (ROWS, v))
    got = np.asarray(jax.jit(draw)(rows, row_keys(11, np.arange(ROWS))))
    assert got.min() >= 0 and got.max() < v and set(got.tolist()) == set(hot)
    freq = np.bincount(got, minlength=v) / ROWS
    assert max(abs(freq[i] - p) for i, p in hot.items()) < 0.015
