"""The training step and the evaluation step: pure functions of (state, batch), jitted by the trainer.

Loss (normalised units, means over batch and dimensions):

    mse = mean |y - y^|^2                       y: the target (the input for an SAE), y^: the reconstruction
    aux = min(dead / k_aux, 1) * mean |e - e^|^2 AuxK (Gao et al. 2024, App. A.2): e = y - y^ (a constant),
                                                e^ = z_aux @ W_dec (no bias: b_dec is already in y^), z_aux
                                                the top-k_aux pre-activations of the dead latents
    loss = mse + aux_coefficient * aux

Decoder rows stay unit norm: the gradient's component parallel to each row is removed before the
optimiser (a move along the row would only change its norm, which the renormalisation undoes) and
the rows are renormalised after the update. A latent is dead once it has not fired for `dead_tokens`
training tokens; the count is per latent, over the global batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from harvest.sae.model import SparseCoder
from harvest.sae.state import SINCE_CAP, Accum, TrainState

__all__ = ["StepConfig", "auxk_loss", "project_out_parallel", "accumulate", "make_train_step", "make_eval_step"]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    k_aux: int
    aux_coefficient: float
    dead_tokens: int
    threshold_lr: float
    batchtopk: bool = False  # track the inference threshold


def auxk_loss(pre: jax.Array, dead: jax.Array, err: jax.Array, w_dec: jax.Array, k_aux: int) -> jax.Array:
    """pre [B, S], dead [S] bool, err [B, d_out] (held constant), w_dec [S, d_out] -> [] AuxK loss."""
    masked = jnp.where(dead[None, :], pre, -jnp.inf)  # [B, S] live latents never enter
    vals, idx = jax.lax.top_k(masked, k_aux)  # [B, k_aux]
    vals = jnp.where(jnp.isfinite(vals), vals, 0.0)  # fewer dead latents than k_aux
    z_aux = jnp.put_along_axis(jnp.zeros_like(pre), idx, vals, axis=-1, inplace=False)  # [B, S]
    scale = jnp.minimum(dead.sum() / k_aux, 1.0)  # few dead latents: a proportionally small loss
    return scale * jnp.mean((z_aux @ w_dec - jax.lax.stop_gradient(err)) ** 2)


def project_out_parallel(g: jax.Array, w: jax.Array) -> jax.Array:
    """g, w [S, d]: g minus, row by row, its component along w's (unit) rows."""
    return g - jnp.sum(g * w, axis=-1, keepdims=True) * w


def accumulate(acc: Accum, ref: jax.Array, y: jax.Array, err: jax.Array, z: jax.Array, phase: jax.Array) -> Accum:
    """Add a batch's metric sums. y, err [B, d_out] normalised; z [B, S]; phase [B] int (-1: padding, ignored)."""
    ph = jax.nn.one_hot(phase, 2, dtype=jnp.float32)  # [B, 2]; all zeros for -1
    dev = y - ph @ ref  # [B, d_out] from the row's phase reference
    return dataclasses.replace(
        acc,
        n=acc.n + ph.sum(0),
        err=acc.err + ph.T @ jnp.sum(err**2, axis=-1),
        dev=acc.dev + ph.T @ dev,
        dev_sq=acc.dev_sq + ph.T @ jnp.sum(dev**2, axis=-1),
        l0=acc.l0 + ph.T @ jnp.sum(z > 0, axis=-1, dtype=jnp.float32),
    )


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, sc: StepConfig) -> Callable:
    """-> step(state, x [B, d_in], y [B, d_out], phase [B], lr []) -> (state, loss []); x, y raw activations.
    tx gives the update's direction (Adam); the step scales it by -lr."""

    def loss_fn(params, variables, x, y, dead):
        sae: SparseCoder = nnx.merge(graphdef, params, variables)
        pre = sae.pre_acts(x)  # [B, S]
        z = sae.activate(pre, train=True)  # [B, S]
        y_n = y * sae.scale_out[...]  # [B, d_out]
        err = y_n - sae.decode_normalised(z)  # [B, d_out]
        mse = jnp.mean(err**2)
        aux = auxk_loss(pre, dead, err, sae.W_dec[...], sc.k_aux)
        return mse + sc.aux_coefficient * aux, (z, y_n, err, mse, aux)

    def step(state: TrainState, x, y, phase, lr):
        dead = state.since_fired >= sc.dead_tokens  # [S] from the steps before this one
        (loss, (z, y_n, err, mse, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.variables, x, y, dead
        )
        w_dec = state.params["W_dec"][...]
        grads["W_dec"][...] = project_out_parallel(grads["W_dec"][...], w_dec)
        direction, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, jax.tree.map(lambda u: -lr * u, direction))
        w = params["W_dec"][...]
        params["W_dec"][...] = w / jnp.linalg.norm(w, axis=-1, keepdims=True)

        variables = state.variables
        z = jax.lax.stop_gradient(z)
        if sc.batchtopk:  # the inference threshold: EMA of the smallest activation batch top-k kept
            pos = jnp.where(z > 0, z, jnp.inf)
            smallest = jnp.min(pos)
            old = variables["threshold"][...]
            new = jnp.where(jnp.isfinite(smallest), (1 - sc.threshold_lr) * old + sc.threshold_lr * smallest, old)
            variables = jax.tree.map(lambda v: v, variables)  # a copy: the caller's state stays as it was
            variables["threshold"][...] = new
        fired = jnp.any(z > 0, axis=0)  # [S]
        since = jnp.where(fired, 0, jnp.minimum(state.since_fired + x.shape[0], SINCE_CAP))
        acc = accumulate(state.acc, state.ref, y_n, err, z, phase)
        acc = dataclasses.replace(acc, loss=acc.loss + loss, mse=acc.mse + mse, aux=acc.aux + aux, steps=acc.steps + 1)
        new = dataclasses.replace(
            state,
            step=state.step + 1,
            params=params,
            variables=variables,
            opt_state=opt_state,
            since_fired=since.astype(jnp.int32),
            acc=acc,
        )
        return new, loss

    return step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """-> eval_step(acc, ref, params, variables, x, y, phase) -> acc, with the inference codes
    (TopK per token; BatchTopK through its threshold). Padding rows carry phase -1."""

    def eval_step(acc: Accum, ref, params, variables, x, y, phase) -> Accum:
        sae: SparseCoder = nnx.merge(graphdef, params, variables)
        z = sae.encode(x)  # [B, S]
        y_n = y * sae.scale_out[...]
        return accumulate(acc, ref, y_n, y_n - sae.decode_normalised(z), z, phase)

    return eval_step
