"""Where the engine's arrays live on a (data, model) device mesh.

    mesh = make_mesh({"data": -1, "model": 1})             # this process's devices
    placement = Placement(cfg, mesh)
    params = placement.put_params(params)                   # weights by their logical axes
    shardings = placement.state_shardings(state)            # the slot pool: rows over `data`

`data` splits the rows: the decode slots (KV cache, logits, capture buffers, tokens) and the prefill
lanes. `model` splits the weights by the logical axes that `params.ParamSpec` declares (heads, KV heads,
MLP width, vocabulary) when the axis divides evenly, and the KV cache's head axis with them; any other
weight is replicated. When `model` does not divide the KV heads (Qwen2.5-0.5B has 2, 7B has 4), the K/V
projections and the cache are replicated over `model`: each model shard computes every KV head, which
costs little (the K/V projections are 1/7 of a layer's attention weights in Qwen2) but keeps the
cache's full size on every model shard. GSPMD inserts the collectives; the jitted programs are the
one-device programs.

A mesh is built from this process's own devices (`jax.local_devices()`): under `jax.distributed`,
each process harvests its own share of the sequences on its own devices, so nothing is ever
gathered across hosts, and a finished slot is copied to the host from the devices that hold it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from harvest.engine.config import ModelConfig
from harvest.engine.params import param_axes
from harvest.engine.state import PrefillChunk, SlotState
from harvest.errors import FieldError

AXES = ("data", "model")


def check_mesh_axes(axes) -> None:
    """{data: n, model: m}: sizes >= 1 or one -1 (the devices left); FieldError("mesh", ...) otherwise."""
    if not isinstance(axes, dict) or not set(axes) <= set(AXES) or not axes:
        raise FieldError("mesh", f"axes are data and model, e.g. {{data: -1, model: 1}}; got {axes!r}")
    for name, v in axes.items():
        if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
            raise FieldError(f"mesh.{name}", f"{v!r} is impossible; it must be >= 1, or -1 for the devices left")
    if list(axes.values()).count(-1) > 1:
        raise FieldError("mesh", "at most one axis may be -1")


def mesh_shape(axes: dict[str, int], n_devices: int) -> dict[str, int]:
    """{data: n, model: m} with a -1 resolved to the devices left (data defaults to -1, model to 1)."""
    check_mesh_axes(axes)
    sizes = {"data": axes.get("data", -1), "model": axes.get("model", 1)}
    if list(sizes.values()).count(-1) > 1:
        raise FieldError("mesh", "at most one axis may be -1")
    known = math.prod(v for v in sizes.values() if v != -1)
    for name, v in sizes.items():
        if v == -1:
            if n_devices % known:
                raise FieldError("mesh", f"{n_devices} devices do not split into {known} x -1; give both sizes")
            sizes[name] = n_devices // known
    if sizes["data"] * sizes["model"] > n_devices:
        raise FieldError(
            "mesh", f"{sizes} needs {sizes['data'] * sizes['model']} devices, this process has {n_devices}"
        )
    return sizes


def make_mesh(axes: dict[str, int], devices=None) -> Mesh:
    """A (data, model) mesh over the first data x model of `devices` (default: this process's devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    sizes = mesh_shape(axes, len(devices))
    grid = np.array(devices[: sizes["data"] * sizes["model"]]).reshape(sizes["data"], sizes["model"])
    return Mesh(grid, AXES)


def split_axes(cfg: ModelConfig, model: int) -> dict[str, bool]:
    """Which logical axes split over `model`: only those it divides (whole heads per shard)."""
    sizes = {"heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads, "mlp": cfg.d_mlp, "vocab": cfg.vocab_size}
    return {name: model > 1 and n % model == 0 for name, n in sizes.items()}


def state_specs(state: SlotState, model: int) -> SlotState:
    """Every [N, ...] array's rows over `data`; the cache [L, N, K, S, Dh] its rows and also its KV heads over
    `model` when `model` divides them. Read off the shapes, so the same rule serves inside and outside a jit."""
    kv_heads = state.cache[0].shape[2] if state.cache else 0
    kv = PartitionSpec(None, "data", "model" if model > 1 and kv_heads % model == 0 else None)
    rows = jax.tree.map(lambda a: PartitionSpec("data") if a.size else PartitionSpec(), state)  # XLA drops 0-size
    return dataclasses.replace(rows, cache=jax.tree.map(lambda _: kv, state.cache))


def constrain_state(state: SlotState) -> SlotState:
    """Inside a program: pin the pool's layout to the context mesh's (jax.set_mesh), so each program
    returns the pool as the next one takes it (no resharding, no recompiles). No mesh: unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return state
    return jax.lax.with_sharding_constraint(state, state_specs(state, mesh.shape["model"]))


def constrain_rows(tree):
    """Inside a program: every array of `tree` split by rows over the context mesh's `data` (no mesh: unchanged)."""
    if jax.sharding.get_abstract_mesh().empty:
        return tree
    return jax.lax.with_sharding_constraint(tree, jax.tree.map(lambda _: PartitionSpec("data"), tree))


class Placement:
    """Puts the engine's arrays on one mesh: weights by their logical axes, the pool and prefill lanes by rows."""

    def __init__(self, cfg: ModelConfig, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.data, self.model = mesh.shape["data"], mesh.shape["model"]
        self.split = split_axes(cfg, self.model)

    def _named(self, *spec) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def check_rows(self, name: str, n: int) -> None:
        """Row counts (lanes, slots) split evenly over `data`."""
        if n % self.data:
            raise FieldError(name, f"{n} does not split over mesh data={self.data}; use a multiple of {self.data}")

    def param_shardings(self, params: dict):
        """The params pytree's shardings, from each leaf's logical axes (params.param_axes)."""
        axes = param_axes(self.cfg)
        layer_axes = axes["layers"][0] if axes["layers"] else {}
        axes = {**axes, "layers": tuple(axes["layers"][: len(params["layers"])])}  # prefill-only truncation
        if "stacked" in params:  # params.with_stacked: a leading layer axis, never split
            axes["stacked"] = {name: (None, *a) for name, a in layer_axes.items()}

        def one(leaf_axes):
            return self._named(*("model" if a is not None and self.split[a] else None for a in leaf_axes))

        return jax.tree.map(
            one, axes, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, str | None) for a in x)
        )

    def put_params(self, params: dict) -> dict:
        return jax.device_put(params, self.param_shardings(params))

    def replicated(self, tree):
        return jax.device_put(tree, self._named())

    def state_shardings(self, state: SlotState) -> SlotState:
        """The pool's NamedShardings (state may be abstract: jax.eval_shape's)."""
        specs = state_specs(state, self.model)
        return jax.tree.map(
            lambda p: NamedSharding(self.mesh, p), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
        )

    def put_chunk(self, chunk: PrefillChunk) -> PrefillChunk:
        """A prefill call's lanes over `data` (the scalar seed: replicated)."""
        return jax.device_put(chunk, jax.tree.map(lambda a: self._named(*("data",)[: np.ndim(a)]), chunk))
