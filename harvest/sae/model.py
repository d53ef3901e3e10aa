"""The sparse coder, in Flax NNX: a TopK SAE (Gao et al. 2024, the default), BatchTopK (Bussmann et
al. 2024) and a TopK transcoder (encode one hook, predict another on the same token rows).

    sae = SparseCoder(spec, rngs=nnx.Rngs(0))
    z = sae.encode(x)                  # x: [B, d_in] RAW activations -> [B, d_sae], <= k non-zero per row
    x_hat = sae.decode(z)              # [B, d_out] RAW
    x_hat = reconstruct(sae, x)        # the same, the seam for a spliced-model evaluation

Units. The weights work in normalised units: the input is multiplied by `scale_in` and the output
predicted in units of `scale_out` (sqrt(d) / E|x| from the store's statistics, SAELens' scalar
scale factor, so that E|x| = sqrt(d) whatever the layer's norm). The scales are Norm variables of the
module, saved and exported with it, so every public method takes and returns raw activations.

    pre = (x * scale_in - b_dec) @ W_enc + b_enc        # SAE; a transcoder does not subtract b_dec,
    z   = act(pre)                                       #   which lives in the output space
    x^  = (z @ W_dec + b_dec) / scale_out                # W_dec rows have unit norm (the trainer keeps them so)

act: TopK keeps each row's k largest pre-activations (ReLU'd). BatchTopK keeps the k * B largest of
the whole batch while training, and at inference a JumpReLU at `threshold`, the running mean of the
smallest activation that batch top-k kept, so a token's code does not depend on its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["SAESpec", "Norm", "Threshold", "SparseCoder", "topk", "batch_topk", "jump_relu", "reconstruct"]


@dataclasses.dataclass(frozen=True)
class SAESpec:
    """The static shape of a sparse coder (hashable: part of the NNX graph definition)."""

    architecture: str  # topk | batchtopk | transcoder
    d_in: int
    d_out: int
    d_sae: int
    k: int
    hook_in: str
    hook_out: str

    @property
    def transcoder(self) -> bool:
        return self.architecture == "transcoder"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SAESpec:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


class Norm(nnx.Variable):
    """A constant normalisation scale (scalar), set from the store's statistics; never trained."""


class Threshold(nnx.Variable):
    """BatchTopK's inference threshold (scalar), an EMA updated by the trainer, not by gradients."""


def topk(pre: jax.Array, k: int) -> jax.Array:
    """[B, S] -> [B, S]: each row's k largest entries, ReLU'd; zeros elsewhere."""
    vals, idx = jax.lax.top_k(pre, k)  # [B, k]
    return jnp.put_along_axis(jnp.zeros_like(pre), idx, jax.nn.relu(vals), axis=-1, inplace=False)


def batch_topk(pre: jax.Array, k: int) -> jax.Array:
    """[B, S] -> [B, S]: the k * B largest entries of the whole batch, ReLU'd; zeros elsewhere."""
    flat = pre.reshape(-1)  # [B * S]
    vals, idx = jax.lax.top_k(flat, k * pre.shape[0])  # [k B]
    return jnp.zeros_like(flat).at[idx].set(jax.nn.relu(vals)).reshape(pre.shape)


def jump_relu(pre: jax.Array, threshold: jax.Array) -> jax.Array:
    """[B, S] -> [B, S]: relu(pre) where pre > threshold (SAELens' JumpReLU, a scalar threshold here)."""
    return jnp.where(pre > threshold, jax.nn.relu(pre), 0.0)


def _unit_rows(w: jax.Array) -> jax.Array:
    return w / jnp.linalg.norm(w, axis=-1, keepdims=True)


class SparseCoder(nnx.Module):
    """Parameters W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out] (nnx.Param);
    scale_in, scale_out (Norm) and threshold (Threshold), scalars."""

    def __init__(self, spec: SAESpec, *, rngs: nnx.Rngs):
        self.spec = spec
        w_dec = _unit_rows(jax.random.normal(rngs.params(), (spec.d_sae, spec.d_out)))  # [S, d_out]
        if spec.transcoder:  # input and output spaces differ: an independent encoder, unit columns
            w_enc = _unit_rows(jax.random.normal(rngs.params(), (spec.d_sae, spec.d_in))).T  # [d_in, S]
        else:  # Gao et al.: the encoder starts as the decoder's transpose
            w_enc = w_dec.T  # [d_in, S]
        self.W_enc = nnx.Param(w_enc)
        self.b_enc = nnx.Param(jnp.zeros((spec.d_sae,)))
        self.W_dec = nnx.Param(w_dec)
        self.b_dec = nnx.Param(jnp.zeros((spec.d_out,)))
        self.scale_in = Norm(jnp.float32(1.0))
        self.scale_out = Norm(jnp.float32(1.0))
        self.threshold = Threshold(jnp.float32(0.0))

    def pre_acts(self, x_raw: jax.Array) -> jax.Array:
        """[B, d_in] raw -> [B, d_sae] pre-activations."""
        x = x_raw.astype(jnp.float32) * self.scale_in[...]
        if not self.spec.transcoder:
            x = x - self.b_dec[...]
        return x @ self.W_enc[...] + self.b_enc[...]

    def activate(self, pre: jax.Array, train: bool = False) -> jax.Array:
        """[B, d_sae] pre-activations -> codes. train=True: BatchTopK over the batch (else its threshold)."""
        if self.spec.architecture != "batchtopk":
            return topk(pre, self.spec.k)
        return batch_topk(pre, self.spec.k) if train else jump_relu(pre, self.threshold[...])

    def encode(self, x_raw: jax.Array) -> jax.Array:
        """[B, d_in] raw -> [B, d_sae] codes (inference: per token, batch-independent)."""
        return self.activate(self.pre_acts(x_raw))

    def decode_normalised(self, z: jax.Array) -> jax.Array:
        """[B, d_sae] -> [B, d_out] in normalised units (what the loss compares)."""
        return z @ self.W_dec[...] + self.b_dec[...]

    def decode(self, z: jax.Array) -> jax.Array:
        """[B, d_sae] -> [B, d_out] raw."""
        return self.decode_normalised(z) / self.scale_out[...]

    def __call__(self, x_raw: jax.Array) -> jax.Array:
        return self.decode(self.encode(x_raw))


def reconstruct(sae: SparseCoder | tuple, x_raw: jax.Array) -> jax.Array:
    """x_raw [..., d_in] -> x_hat [..., d_out], raw activations in, raw out, in x_raw's dtype.

    The seam for a spliced-model evaluation: substitute the hook's activation with this (an SAE) or
    the output hook's activation with it (a transcoder). Pure and jit-able: pass the module (under
    nnx.jit) or its (graphdef, state) = nnx.split(sae) pair (under jax.jit, as a closed-over constant
    or an argument). Leading axes ([batch, seq, d]) are flattened and restored. Inference codes:
    TopK per token; BatchTopK through its threshold, so a token's output never depends on its batch.
    """
    if isinstance(sae, tuple):
        sae = nnx.merge(*sae)
    lead = x_raw.shape[:-1]
    x = x_raw.reshape(-1, x_raw.shape[-1])  # [T, d_in]
    return sae(x).astype(x_raw.dtype).reshape(*lead, sae.spec.d_out)
