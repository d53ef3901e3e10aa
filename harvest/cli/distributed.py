"""Several harvest processes writing one run: JAX's multi-controller start-up, each process's share of
the sequences, and the few points where the processes meet.

    share = start(cfg.runtime.distributed)      # before anything touches a device
    mine = take_share(costs, share)             # sequence ids: disjoint, deterministic, balanced by tokens
    agree({"inputs": ...}, share, fix)          # every process the same, or every process stops
    barrier("harvest/prepared", share)          # process 0 has checked (or cleared) the folder

Each process runs its own engine on its own devices (`jax.local_devices()`, runtime.mesh) and writes
its own shards (the shard indices it owns, harvest.store.format.ProcessShare). Activations never cross
hosts: the processes meet only at barriers and to compare or sum a few small values, which
`jax.experimental.multihost_utils` does with tiny collectives over every device. No cluster code of our
own: `jax.distributed.initialize` finds the coordinator, the process count and this process's id from
runtime.distributed, or detects them as JAX does (Cloud TPU, SLURM, Open MPI, Kubernetes).

A process that fails on its own (out of memory, a killed host) leaves the others waiting at the next
meeting point until JAX's heartbeat declares it dead (runtime.distributed.heartbeat_timeout_seconds,
100 s by default); they then stop too, and the same command on every process resumes the run. Errors
every process can see (a bad config, other inputs on one host, a folder the hosts do not share) are
checked where all processes meet, so all of them stop at once with the same line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from harvest.errors import FieldError, HarvestError
from harvest.store.format import LONE, ProcessShare

# runtime.distributed keys, passed to jax.distributed.initialize as they are; absent or null: detected
DISTRIBUTED_KEYS = {
    "coordinator_address": (str,),  # host:port of process 0's coordination service
    "num_processes": (int,),
    "process_id": (int,),
    # this process's devices, e.g. 3 for the fourth GPU of a host running one process per GPU; null: all
    # (or CUDA_VISIBLE_DEVICES / JAX_LOCAL_DEVICE_IDS, or what SLURM assigns)
    "local_device_ids": (int, list),
    "initialization_timeout": (int,),  # seconds to wait for every process to join
    "heartbeat_timeout_seconds": (int,),  # how long a silent process is waited for before the others stop
}
GATHER_BYTES = 8192  # the most JSON one process contributes to gather_json


class DistributedError(HarvestError, RuntimeError):
    """The processes of a run cannot start, or disagree on something that must be the same."""


def check_distributed(spec) -> None:
    """runtime.distributed: a mapping of DISTRIBUTED_KEYS (an empty one: detect everything)."""
    if not isinstance(spec, Mapping):
        raise FieldError(
            "distributed", f"expected a mapping like {{coordinator_address: host:1234, num_processes: 2}}, got {spec!r}"
        )
    for key, value in spec.items():
        if key not in DISTRIBUTED_KEYS:
            raise FieldError("distributed", f"unknown key {key!r}; keys are {', '.join(DISTRIBUTED_KEYS)}")
        kinds = DISTRIBUTED_KEYS[key]
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            names = " or ".join("a list of ints" if k is list else k.__name__ for k in kinds)
            raise FieldError(f"distributed.{key}", f"expected {names} or null, got {value!r}")
    ids = spec.get("local_device_ids")
    if isinstance(ids, list) and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise FieldError("distributed.local_device_ids", f"expected device numbers >= 0, got {ids!r}")
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
        try:
            jax.distributed.initialize(**{k: v for k, v in spec.items() if v is not None})
        except (ValueError, RuntimeError) as e:  # no coordinator found or reachable, a timeout, a busy port
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DistributedError(
                f"runtime.distributed: cannot join the run's processes ({detail}); give coordinator_address, "
                f"num_processes and process_id, or run under SLURM, Open MPI or on a Cloud TPU"
            ) from None
    return ProcessShare(jax.process_index(), jax.process_count())


def take_share(costs: Mapping[int, int], share: ProcessShare) -> set[int]:
    """The sequence ids this process harvests, from {sequence id: tokens it will cost}.

    Greedy by cost (the costliest sequence first, to the process with the least so far; ties to the
    lower id and process), so shares differ by at most one sequence's cost. It depends on the costs
    and the process count alone, never on what is committed: every process of a session gives every
    sequence the same owner, and a process skips only what is already committed (with another process
    count, the shares change, and the committed sequences are still skipped)."""
    if share.count == 1:
        return set(costs)
    import heapq

    loads = [(0, p) for p in range(share.count)]  # (tokens so far, process): a heap, least loaded first
    mine = set()
    for seq, cost in sorted(costs.items(), key=lambda kv: (-kv[1], kv[0])):
        load, p = heapq.heappop(loads)
        heapq.heappush(loads, (load + cost, p))
        if p == share.index:
            mine.add(seq)
    return mine


def gather_json(value, share: ProcessShare) -> list:
    """Every process's `value` (anything JSON can hold, exactly: no float rounding), in process order."""
    if share.count == 1:
        return [value]
    import numpy as np
    from jax.experimental import multihost_utils

    data = json.dumps(value, sort_keys=True).encode()
    if len(data) > GATHER_BYTES:
        raise ValueError(f"gather_json: {len(data)} bytes > {GATHER_BYTES}")
    buf = np.zeros(GATHER_BYTES + 4, np.uint8)  # a length prefix, then the JSON
    buf[:4] = np.frombuffer(np.uint32(len(data)).tobytes(), np.uint8)
    buf[4 : 4 + len(data)] = np.frombuffer(data, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(share.count, -1)
    return [json.loads(row[4 : 4 + int(row[:4].view(np.uint32)[0])].tobytes()) for row in rows]


def agree(values: Mapping[str, object], share: ProcessShare, fix: str) -> None:
    """Every process must hold process 0's `values`; otherwise every process raises the same one line,
    naming the first process and key that differ, so no process goes on alone."""
    every = gather_json(dict(values), share)
    for p, theirs in enumerate(every[1:], start=1):
        for key in values:
            if theirs.get(key) != every[0].get(key):
                raise DistributedError(f"process {p} of {share.count} differs from process 0 in {key}; {fix}")


def barrier(name: str, share: ProcessShare) -> None:
    """Wait until every process of the run reaches `name` (no-op for one process)."""
    if share.count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
