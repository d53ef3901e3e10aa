"""Casting captured activations to a narrower float dtype on the host, refusing values it cannot hold.

The engine casts each prompt chunk as it lands on the host (Generator, `GenerateConfig.acts_dtype`), so
the prompts in flight take the storage dtype's bytes, not the model's; the store casts whatever reaches
it still wider (shard.to_storage). Both refuse activations that would become inf, here, in one place.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from harvest.errors import HarvestError

FLOAT_DTYPES = ("bfloat16", "float16", "float32")  # also the store's storage dtypes


class FloatOverflowError(HarvestError, ValueError):
    """Activations beyond the target dtype's range (float16: 65504)."""


def float_dtype(name: str) -> np.dtype:
    """The numpy dtype called `name` (bfloat16 is ml_dtypes')."""
    if name not in FLOAT_DTYPES:
        raise ValueError(f"float dtype {name!r} is not one of {', '.join(FLOAT_DTYPES)}")
    return np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)


def cast(x: np.ndarray, name: str) -> np.ndarray:
    """x as dtype `name` (x itself when it already is). Raises FloatOverflowError rather than turn a
    finite value into inf: large Qwen2 models carry residual values past float16's 65504."""
    x = np.asarray(x)
    with np.errstate(over="ignore"):  # checked just below, with a clearer message
        y = x.astype(float_dtype(name), copy=False)
    if y.dtype == np.float16 and x.dtype != np.float16 and not np.isfinite(y).all() and np.isfinite(x).all():
        raise FloatOverflowError(
            f"activations up to {float(np.abs(x).max()):.0f} overflow float16; use capture.dtype bfloat16 or float32"
        )
    return y
