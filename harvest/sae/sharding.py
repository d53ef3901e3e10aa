"""The device mesh and where each array lives on it.

Data parallel over the mesh axis `data`: every batch is split by rows, parameters and optimiser
state are replicated, and XLA sums the gradients across devices inside the jitted step. An optional
`model` axis splits the latents: W_enc's columns, b_enc, W_dec's rows (and their Adam moments, and
the tokens-since-fired counters) are sharded over it, everything else is replicated.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from harvest.sae.config import ConfigError

__all__ = ["build_mesh", "state_shardings", "batch_sharding", "replicated"]

# array name (a key on the leaf's path) -> how its axes map onto the mesh
_LATENT_SPECS = {
    "W_enc": PartitionSpec(None, "model"),  # [d_in, S]
    "b_enc": PartitionSpec("model"),  # [S]
    "W_dec": PartitionSpec("model", None),  # [S, d_out]
    "since_fired": PartitionSpec("model"),  # [S]
}


def build_mesh(axes: dict[str, int], batch_size: int, d_sae: int) -> Mesh:
    """runtime.mesh {data: n, model: m} (one may be -1: the devices left) -> a (data, model) Mesh over
    the first n * m devices."""
    devices = jax.devices()
    sizes = {"data": axes.get("data", -1), "model": axes.get("model", 1)}
    known = math.prod(v for v in sizes.values() if v != -1)
    for name, v in sizes.items():
        if v == -1:
            if len(devices) % known:
                raise ConfigError(f"runtime.mesh: {len(devices)} devices do not split into {known} x -1; give sizes")
            sizes[name] = len(devices) // known
    total = sizes["data"] * sizes["model"]
    if total > len(devices):
        raise ConfigError(f"runtime.mesh: {sizes} needs {total} devices, there are {len(devices)}; make it smaller")
    if batch_size % sizes["data"]:
        raise ConfigError(
            f"train.batch_size: {batch_size} does not split over runtime.mesh data={sizes['data']}; use a multiple"
        )
    if d_sae % sizes["model"]:
        raise ConfigError(f"sae.d_sae: {d_sae} does not split over runtime.mesh model={sizes['model']}; use a multiple")
    grid = np.array(devices[:total]).reshape(sizes["data"], sizes["model"])
    return Mesh(grid, ("data", "model"))


def _name(entry) -> str | None:
    for attr in ("key", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return None


def state_shardings(mesh: Mesh, state):
    """The NamedSharding of every leaf of a TrainState (or any pytree holding its arrays)."""

    def spec(path, leaf) -> NamedSharding:
        names = {_name(e) for e in path}
        for name, ps in _LATENT_SPECS.items():
            if name in names and getattr(leaf, "ndim", 0) == len(ps):
                return NamedSharding(mesh, ps)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(spec, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over `data`: [B, d] and [B] arrays."""
    return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
