"""The same small harvest on 1, 2, 4 and 8 devices, and on 1 and 2 processes, side by side.

    python bench/scaling.py [--tasks 16] [--new 32] [--model random:tiny]

Each row is a fresh `python -m harvest.run configs/demo.yaml` (whole process, compile included, no
persistent compile cache) on a CPU split into fake devices (XLA_FLAGS
--xla_force_host_platform_device_count), with runtime.mesh {data: n}. The process rows run 2
processes on localhost (jax.distributed), each with its devices, writing one run folder. Printed:
tokens harvested, wall seconds of the slowest process, tokens/s, efficiency against one device
(tokens/s per device over the one-device tokens/s), and whether every run's tokens equal the
one-device run's. "vs 1 device" is the whole run's tokens/s over the one-device run's: on shared cores,
1.00x would mean sharding and extra processes cost nothing.

On a CPU, fake devices share the same cores: this shows correctness and the overhead of sharding and
of several processes, not speedup. On a machine with N accelerators the same command lines scale.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harvest.data import open_store  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def harvest(out: Path, devices: int, processes: int, args) -> float:
    """Run one configuration; -> wall seconds of the slowest process."""
    sets = {
        "model.path": args.model,
        "data.limit": args.tasks,
        "generation.max_new_tokens": args.new,
        "generation.fixed_length": "true",
        "runtime.batch_size": 8,
        "runtime.decode_slots": 16,
        "runtime.mesh": f"{{data: {devices}}}",
        "runtime.compile_cache": "null",
        "runtime.progress": "false",
        "output.path": str(out),
    }
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    port = free_port()
    procs = []
    t0 = time.perf_counter()
    for pid in range(processes):
        extra = dict(sets)
        if processes > 1:
            extra["runtime.distributed"] = (
                f"{{coordinator_address: 'localhost:{port}', num_processes: {processes}, process_id: {pid}}}"
            )
        cmd = [sys.executable, "-m", "harvest.run", str(ROOT / "configs" / "demo.yaml")]
        for k, v in extra.items():
            cmd += ["--set", f"{k}={v}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [p.communicate()[0].decode() for p in procs]
    wall = time.perf_counter() - t0
    for p, text in zip(procs, outputs):
        if p.returncode:
            raise SystemExit(f"{devices} devices x {processes} processes failed (exit {p.returncode}):\n{text[-3000:]}")
    return wall


def tokens_of(store) -> dict[int, np.ndarray]:
    return {int(s): store.sequence(int(s))["token_id"] for s in store.sequences["sequence_id"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    rows = [(1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (4, 2)]  # (devices per process, processes)
    print(f"harvest scaling: {args.model}, {args.tasks} tasks, {args.new} new tokens, batch 8, 16 decode slots")
    print(f"CPU: {os.cpu_count()} cores shared by every fake device and process: overhead, not speedup\n")
    print(
        f"{'devices':>8} {'procs':>6} {'tokens':>8} {'wall s':>8} {'tok/s':>8} {'vs 1 device':>12} "
        f"{'efficiency':>11}  same tokens"
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        reference, base = None, None
        for devices, processes in rows:
            out = Path(tmp) / f"d{devices}-p{processes}"
            wall = harvest(out, devices, processes, args)
            store = open_store(out)
            rate = store.num_tokens / wall
            toks = tokens_of(store)
            if reference is None:
                reference, base = toks, rate
            same = toks.keys() == reference.keys() and all(np.array_equal(toks[k], reference[k]) for k in toks)
            total = devices * processes
            eff = rate / (base * total)
            print(
                f"{total:>8} {processes:>6} {store.num_tokens:>8,} {wall:>8.1f} {rate:>8,.0f} {rate / base:>11.2f}x "
                f"{eff:>10.0%}  {same}"
            )
            results.append(dict(devices=total, processes=processes, tokens=store.num_tokens, wall_s=wall, same=same))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
