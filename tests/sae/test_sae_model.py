"""The sparse coder's pieces on tiny arrays: activations, AuxK, the decoder-norm constraint, init, the seam."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from harvest.sae.model import SAESpec, SparseCoder, batch_topk, jump_relu, reconstruct, topk
from harvest.sae.objective import StepConfig, auxk_loss, make_train_step, project_out_parallel
from harvest.sae.state import geometric_median, init_state

SPEC = SAESpec("topk", 8, 8, 32, 4, "h", "h")


def test_topk_keeps_k_relu_values_per_row():
    pre = jax.random.normal(jax.random.PRNGKey(0), (16, 32))
    z = np.asarray(topk(pre, 4))
    assert ((z != 0).sum(1) <= 4).all()
    for row, p in zip(z, np.asarray(pre)):
        top = np.sort(p)[-4:]
        assert np.allclose(np.sort(row[row != 0]), top[top > 0])


def test_batch_topk_keeps_k_per_row_on_average():
    pre = jax.random.normal(jax.random.PRNGKey(1), (16, 32)) + 3.0  # all positive: exactly k * B survive
    z = np.asarray(batch_topk(pre, 4))
    assert (z != 0).sum() == 4 * 16
    assert (z != 0).sum(1).std() > 0  # per row it varies
    assert z[z != 0].min() >= np.sort(np.asarray(pre).ravel())[-64]


def test_jump_relu():
    pre = jnp.array([[-1.0, 0.2, 0.5, 2.0]])
    assert np.asarray(jump_relu(pre, jnp.float32(0.3))).tolist() == [[0.0, 0.0, 0.5, 2.0]]


def test_project_out_parallel_is_orthogonal_to_rows():
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    w = jax.random.normal(k1, (32, 8))
    w = w / jnp.linalg.norm(w, axis=1, keepdims=True)
    g = project_out_parallel(jax.random.normal(k2, (32, 8)), w)
    assert np.abs(np.asarray(jnp.sum(g * w, axis=1))).max() < 1e-6


def test_auxk_is_zero_without_dead_latents_and_trains_the_dead_ones():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    pre, err, w = jax.random.normal(k1, (16, 32)), jax.random.normal(k2, (16, 8)), jax.random.normal(k3, (32, 8))
    none = jnp.zeros(32, bool)
    assert float(auxk_loss(pre, none, err, w, 4)) == 0.0
    dead = jnp.arange(32) < 10
    g = jax.grad(lambda w_: auxk_loss(pre, dead, err, w_, 4))(w)
    assert float(auxk_loss(pre, dead, err, w, 4)) > 0
    assert np.abs(np.asarray(g[10:])).max() == 0 and np.abs(np.asarray(g[:10])).max() > 0  # live rows untouched


def _state(spec=SPEC, seed=0):
    sae = SparseCoder(spec, rngs=nnx.Rngs(params=seed))
    tx = optax.scale_by_adam()
    return sae, tx, init_state(sae, tx, np.zeros((2, spec.d_out)))


def test_init_encoder_is_decoder_transpose_with_unit_rows():
    sae, _, _ = _state()
    w_dec = np.asarray(sae.W_dec[...])
    assert np.allclose(np.linalg.norm(w_dec, axis=1), 1, atol=1e-6)
    assert np.array_equal(np.asarray(sae.W_enc[...]), w_dec.T)


def test_train_step_keeps_decoder_rows_unit_norm():
    sae, tx, state = _state()  # (BatchTopK's step: test_sae_train.py)
    step = jax.jit(make_train_step(nnx.graphdef(sae), tx, StepConfig(4, 1 / 32, 10, 0.5)))
    x = jax.random.normal(jax.random.PRNGKey(4), (64, 8))
    phase = jnp.zeros(64, jnp.int32)
    for _ in range(5):
        state, loss = step(state, x, x, phase, jnp.float32(1e-2))
    w = np.asarray(state.params["W_dec"][...])
    assert np.allclose(np.linalg.norm(w, axis=1), 1, atol=1e-5)
    assert int(state.step) == 5 and np.isfinite(float(loss))
    assert int(state.acc.steps) == 5 and float(state.acc.n[0]) == 5 * 64
    assert int(np.asarray(state.since_fired).max()) <= 5 * 64


def test_geometric_median_resists_outliers():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)) * 0.1 + 1.0
    x[:10] += 100.0
    gm = geometric_median(x)
    assert np.abs(gm - 1.0).max() < 0.1 < np.abs(x.mean(0) - 1.0).max()


def test_reconstruct_takes_raw_activations_any_leading_axes_and_keeps_dtype():
    sae, _, _ = _state()
    sae.scale_in[...] = jnp.float32(4.0)
    sae.scale_out[...] = jnp.float32(4.0)
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 5, 8))
    flat = np.asarray(sae(x.reshape(10, 8)))
    out = reconstruct(sae, x)
    assert out.shape == (2, 5, 8) and np.allclose(np.asarray(out).reshape(10, 8), flat, atol=1e-6)
    assert reconstruct(sae, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    graphdef, state = nnx.split(sae)
    jitted = jax.jit(lambda s, v: reconstruct((graphdef, s), v))  # the pure-function form
    assert np.allclose(np.asarray(jitted(state, x)), np.asarray(out), atol=1e-6)
    # raw units: scaling the input by the inverse normalisation is what the weights see
    z = np.asarray(sae.encode(x.reshape(10, 8)))
    assert ((z != 0).sum(1) <= SPEC.k).all()
