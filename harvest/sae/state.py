"""The training state (one typed pytree: what a checkpoint holds), its initialisation and the optimiser.

TrainState = the SAE's parameters and variables (nnx.State, split from the SparseCoder module), the
optax state, the step, the tokens since each latent last fired, and the metric sums of the current
logging window. Everything the next step depends on is in it, so a restored state continues a
training exactly.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from harvest.sae.config import TrainConfig
from harvest.sae.model import SAESpec, SparseCoder

__all__ = ["Accum", "TrainState", "make_optimizer", "lr_at", "geometric_median", "init_sae", "init_state"]

SINCE_CAP = 2**30  # tokens-since-fired saturate here (int32), far above any dead window


@flax.struct.dataclass
class Accum:
    """Sums over a logging window (or an evaluation), per phase: index 0 prefill (prompt), 1 decode (answer).
    Deviations are taken from `ref` (TrainState), each phase's mean from the store's statistics, so that
    float32 sums of squares do not cancel for activations with a large mean."""

    n: jax.Array  # [2] rows
    err: jax.Array  # [2] sum |y - y^|^2 (normalised units)
    dev: jax.Array  # [2, d_out] sum (y - ref)
    dev_sq: jax.Array  # [2] sum |y - ref|^2
    l0: jax.Array  # [2] sum of active latents
    loss: jax.Array  # [] sum over steps
    mse: jax.Array  # []
    aux: jax.Array  # []
    steps: jax.Array  # []

    @classmethod
    def zeros(cls, d_out: int) -> Accum:
        # distinct arrays: the jitted step donates the state, and one buffer may not be donated twice
        z2 = lambda: jnp.zeros((2,), jnp.float32)
        z = lambda: jnp.zeros((), jnp.float32)
        return cls(z2(), z2(), jnp.zeros((2, d_out), jnp.float32), z2(), z2(), z(), z(), z(), z())


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32
    params: nnx.State  # nnx.Param: W_enc [d_in, S], b_enc [S], W_dec [S, d_out], b_dec [d_out]
    variables: nnx.State  # Norm scale_in, scale_out; Threshold threshold (scalars)
    opt_state: optax.OptState
    since_fired: jax.Array  # [S] int32 training tokens since the latent was last active
    ref: jax.Array  # [2, d_out] per-phase reference for the metric sums (normalised units)
    acc: Accum


def lr_at(cfg: TrainConfig, d_sae: int, step: int) -> float:
    """The learning rate of step `step` (0-based): linear warmup (the first step already moves), constant,
    then linear decay to 0 over the last decay_steps. Computed on the host and passed to the jitted step,
    so the compiled program does not depend on the schedule's lengths."""
    lr, total, warm, decay = cfg.lr(d_sae), cfg.total_steps, cfg.train.warmup_steps, cfg.decay_steps
    if step < warm:
        return lr * (step + 1) / warm
    if decay and step >= total - decay:
        return lr * (total - step) / decay
    return lr


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Adam's direction (optional clipping first); the trainer scales it by -lr_at(step)."""
    t = cfg.train
    adam = optax.scale_by_adam(b1=t.b1, b2=t.b2, eps=t.eps)
    return adam if t.max_grad_norm is None else optax.chain(optax.clip_by_global_norm(t.max_grad_norm), adam)


def geometric_median(x: np.ndarray, iters: int = 200, tol: float = 1e-7) -> np.ndarray:
    """[n, d] -> [d]: the point minimising the sum of distances (Weiszfeld's iteration, float64).
    Less pulled than the mean by the heavy-norm rows residual streams have."""
    x = x.astype(np.float64)
    m = x.mean(axis=0)
    for _ in range(iters):
        w = 1.0 / np.maximum(np.linalg.norm(x - m, axis=1), 1e-12)  # [n]
        new = (w[:, None] * x).sum(axis=0) / w.sum()
        done = np.linalg.norm(new - m) <= tol * max(np.linalg.norm(m), 1.0)
        m = new
        if done:
            break
    return m


def _centre(x: np.ndarray, how: str) -> np.ndarray:
    if how == "geometric_median":
        return geometric_median(x)
    return x.astype(np.float64).mean(axis=0) if how == "mean" else np.zeros(x.shape[1])


def init_sae(
    spec: SAESpec, cfg: TrainConfig, scales: tuple[float, float], sample: tuple[np.ndarray, np.ndarray]
) -> SparseCoder:
    """A fresh SparseCoder: random unit decoder rows (seeded), encoder = decoder transpose (SAE),
    the store's scales, and b_dec at the centre (geometric median or mean) of a sample of training
    rows. A transcoder also starts with its pre-activations centred: b_enc = -centre(x_in) @ W_enc."""
    sae = SparseCoder(spec, rngs=nnx.Rngs(params=cfg.train.seed))
    sae.scale_in[...] = jnp.float32(scales[0])
    sae.scale_out[...] = jnp.float32(scales[1])
    x, y = sample  # [n, d_in], [n, d_out] raw
    how = cfg.sae.b_dec_init
    sae.b_dec[...] = jnp.asarray(_centre(y * scales[1], how), jnp.float32)
    if spec.transcoder:
        c_in = jnp.asarray(_centre(x * scales[0], how), jnp.float32)
        sae.b_enc[...] = -(c_in @ sae.W_enc[...])
    return sae


def init_state(sae: SparseCoder, tx: optax.GradientTransformation, ref: np.ndarray) -> TrainState:
    _, params, variables = nnx.split(sae, nnx.Param, ...)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        variables=variables,
        opt_state=tx.init(params),
        since_fired=jnp.zeros((sae.spec.d_sae,), jnp.int32),
        ref=jnp.asarray(ref, jnp.float32),
        acc=Accum.zeros(sae.spec.d_out),
    )
