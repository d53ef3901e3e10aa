"""Several harvest processes writing one run: JAX's multi-controller start-up, each process's share of
the sequences, and the barriers around the steps only process 0 takes.

    share = start(cfg.runtime.distributed)      # before anything touches a device
    mine = take_share(costs, share)             # sequence ids: disjoint, deterministic, balanced by tokens
    barrier("harvest/prepared", share)          # process 0 has checked (or cleared) the folder

Each process runs its own engine on its own devices (`jax.local_devices()`, runtime.mesh) and writes
its own shards (the shard indices it owns, harvest.store.format.ProcessShare). Nothing crosses hosts
but the barriers: a harvest needs no collective between processes, so a slow host never stalls the
others' devices. No cluster code of our own: `jax.distributed.initialize` finds the coordinator, the
process count and this process's id from runtime.distributed, or detects them as JAX does (Cloud TPU,
SLURM, Open MPI, Kubernetes, JAX_COORDINATOR_ADDRESS).
"""

from __future__ import annotations

from collections.abc import Mapping

from harvest.errors import FieldError
from harvest.store.format import LONE, ProcessShare

# runtime.distributed keys, passed to jax.distributed.initialize as they are; absent or null: detected
DISTRIBUTED_KEYS = {
    "coordinator_address": str,  # host:port of process 0's coordination service
    "num_processes": int,
    "process_id": int,
    "initialization_timeout": int,  # seconds to wait for every process to join
    "heartbeat_timeout_seconds": int,  # how long a silent process is waited for before the others stop
}


def check_distributed(spec) -> None:
    """runtime.distributed: a mapping of DISTRIBUTED_KEYS (an empty one: detect everything)."""
    if not isinstance(spec, Mapping):
        raise FieldError(
            "distributed", f"expected a mapping like {{coordinator_address: host:1234, num_processes: 2}}, got {spec!r}"
        )
    for key, value in spec.items():
        if key not in DISTRIBUTED_KEYS:
            raise FieldError("distributed", f"unknown key {key!r}; keys are {', '.join(DISTRIBUTED_KEYS)}")
        want = DISTRIBUTED_KEYS[key]
        if value is not None and (not isinstance(value, want) or isinstance(value, bool)):
            raise FieldError(f"distributed.{key}", f"expected {want.__name__} or null, got {value!r}")
    n, i = spec.get("num_processes"), spec.get("process_id")
    if n is not None and n < 1:
        raise FieldError("distributed.num_processes", f"{n} is impossible; it must be >= 1")
    if i is not None and (i < 0 or (n is not None and i >= n)):
        raise FieldError("distributed.process_id", f"{i} is impossible; it must be in [0, num_processes)")


def start(spec: Mapping | None) -> ProcessShare:
    """Join the run's processes (runtime.distributed) and return this process's share. None: one process."""
    if spec is None:
        return LONE
    import jax

    check_distributed(spec)
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(**{k: v for k, v in spec.items() if v is not None})
    return ProcessShare(jax.process_index(), jax.process_count())


def take_share(costs: Mapping[int, int], share: ProcessShare) -> set[int]:
    """The sequence ids this process harvests, from {sequence id: tokens it will cost}.

    Greedy by cost (the costliest sequence first, to the process with the least so far; ties to the
    lower id and process), so shares differ by at most one sequence's cost. It depends on the costs
    alone, never on what is committed: a resumed run, on any process, gives every sequence the same
    owner, and a process skips only what is already committed."""
    if share.count == 1:
        return set(costs)
    load = [0] * share.count
    mine = set()
    for seq, cost in sorted(costs.items(), key=lambda kv: (-kv[1], kv[0])):
        p = min(range(share.count), key=lambda q: (load[q], q))
        load[p] += cost
        if p == share.index:
            mine.add(seq)
    return mine


def gather(values: Mapping[str, float], share: ProcessShare) -> list[dict[str, float]]:
    """Every process's `values` (the same keys everywhere), in process order."""
    if share.count == 1:
        return [dict(values)]
    import numpy as np
    from jax.experimental import multihost_utils

    keys = sorted(values)
    rows = multihost_utils.process_allgather(np.array([float(values[k]) for k in keys], np.float64))  # [P, n]
    return [dict(zip(keys, map(float, row))) for row in np.asarray(rows).reshape(share.count, len(keys))]


def barrier(name: str, share: ProcessShare) -> None:
    """Wait until every process of the run reaches `name` (no-op for one process)."""
    if share.count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
