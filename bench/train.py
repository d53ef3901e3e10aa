"""SAE training throughput: the real loader (store.batches through the trainer's data path) next to an
in-memory list of the very same batches, side by side in one process.

    .venv/bin/python bench/train.py                          # builds /tmp/harvest-bench-train (~330 MB)
    .venv/bin/python bench/train.py --steps 15 --rounds 2 --warmup 3   # the defaults: 30 timed steps each way
    .venv/bin/python bench/train.py --path RUN --hook H      # an existing store

What runs. The synthetic store is bench/loader.py's (harvest's own BackgroundWriter: bf16, d = 896,
blosc-zstd). A `harvest.sae.trainer.Trainer` is built from a config (topk, d_sae 16384, k 32, batch
4096), so the state, the optimiser, the sharding and the jitted step are the trainer's own. The
trainer's loop (`Trainer.run`) takes its batches only from `TrainData.batches`, and has no seam for
another iterator; so this script drives the trainer's pieces directly: `_start()` (fresh state),
`_compile()` (the jitted, state-donating `train_step`), and the same per-step call the loop makes,
`train_step(state, batch.x, batch.y, batch.phase, lr)`, with no metrics windows, evaluations or
checkpoints. Each way starts from the same initial state (a host copy put back on the device).

    loader:    batches come from `trainer.data.batches()` (store.batches, with_rows, float32 cast,
               held-out rows dropped, re-cut to exact batches), read-ahead threads running while the
               steps compute, as in `harvest train`
    in-memory: the same warmup + steps batches, taken from that stream once before timing and kept in
               a Python list (float32 numpy arrays): next() costs nothing

Each run does `--warmup` untimed steps (compilation, the loader's first buffer) then `--steps` timed
steps, and blocks on the state at the end; `--rounds` runs of each way alternate in ABBA order, so a
change of load on the shared cores hits both ways alike. Every run sees the same batches in the same
order from the same state, so all losses must agree (printed). The page cache is warm for the loader
(the in-memory batches were read from it), as in bench/loader.py: this measures decode + copy +
contention for the cores, not the disk.

loader share of step time = (t_loader - t_mem) / t_loader, with t the seconds per step. Before the
timed runs the loader also runs alone, flat out, over the same batches: its wall and CPU seconds per
batch bound its cost independently of the load on the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
from loader import HOOK, build  # noqa: E402  (bench/loader.py: the synthetic store)

from harvest.data import open_store  # noqa: E402
from harvest.sae.config import from_dict  # noqa: E402
from harvest.sae.state import lr_at  # noqa: E402
from harvest.sae.trainer import Trainer  # noqa: E402


def make_trainer(args, out: Path) -> Trainer:
    total = args.warmup + args.steps
    cfg = from_dict(
        {
            "data": {"store": str(args.path), "hook": args.hook, "eval_fraction": args.eval_fraction},
            "sae": {"d_sae": args.d_sae, "k": args.k, "init_tokens": args.batch},
            "train": {
                "batch_size": args.batch,
                "steps": total,
                "warmup_steps": 1,
                "decay_steps": 0,
                "log_every": total,
                "checkpoint_every": total,
            },
            "output": {"path": str(out), "saelens": False},
            "runtime": {"progress": False, "compile_cache": None, "mesh": {"data": -1}},
        }
    )
    return Trainer(cfg, overwrite=True)


def run_steps(tr: Trainer, graphdef, host_state, batches, warmup: int, steps: int) -> dict:
    """warmup untimed + steps timed training steps on batches from the iterator `batches`."""
    cfg, d_sae = tr.cfg, tr.spec.d_sae
    state = jax.device_put(host_state, tr.shardings)
    losses, wait, t0, cpu0 = [], 0.0, None, None
    for i in range(warmup + steps):
        if i == warmup:
            jax.block_until_ready(state)
            t0, cpu0, wait = time.perf_counter(), time.process_time(), 0.0
        tw = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - tw
        lr = np.float32(lr_at(cfg, d_sae, i))
        state, loss = tr.train_step(state, batch.x, batch.y, batch.phase.astype(np.int32), lr)
        losses.append(loss)
    jax.block_until_ready(state)
    return {
        "seconds": time.perf_counter() - t0,
        "cpu": time.process_time() - cpu0,  # this process, all threads (XLA's and the loader's)
        "wait": wait,  # in next(): the loader's stalls (dispatch is asynchronous, so reads overlap steps)
        "steps": steps,
        "load": os.getloadavg()[0],
        "losses": np.array([float(v) for v in losses]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", type=Path, default=Path("/tmp/harvest-bench-train"))
    ap.add_argument("--hook", default=HOOK)
    ap.add_argument("--mb", type=int, default=320, help="activation MB of the synthetic store")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=15, help="timed steps per run")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each way, alternating ABBA")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per run (compilation, first buffer)")
    ap.add_argument("--eval-fraction", type=float, default=0.1)
    args = ap.parse_args()
    if not (args.path / "commits").is_dir():
        print(f"building a {args.mb} MB bf16 d=896 store in {args.path} ...", flush=True)
        build(args.path, args.mb, 896, "blosc-zstd")
    store = open_store(args.path)
    print(
        f"{store!r}\ncores: {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.2f}, "
        f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="harvest-bench-train-") as tmp:
        t0 = time.perf_counter()
        tr = make_trainer(args, Path(tmp) / "out")
        graphdef, state, position = tr._start()  # statistics (cached in the store), b_dec init, fresh state
        tr._compile(graphdef)
        host_state = jax.device_get(state)
        del state
        n = args.warmup + args.steps
        need = n * args.batch
        if tr.data.num_train < need:
            raise SystemExit(
                f"{tr.data.num_train:,} training rows, fewer than the {need:,} of {n} steps in one epoch; "
                "raise --mb or lower --steps"
            )
        stream = tr.data.batches(position)
        kept = [next(stream) for _ in range(n)]  # the in-memory copy of the batches the loader will give
        stream.close()
        print(
            f"setup {time.perf_counter() - t0:.1f} s: {tr.spec.architecture} d_in {tr.spec.d_in} d_sae "
            f"{tr.spec.d_sae} k {tr.spec.k}, batch {args.batch}, {tr.data.num_train:,} training rows; "
            f"{n} batches kept in memory ({sum(b.x.nbytes for b in kept) / 2**20:.0f} MiB float32)",
            flush=True,
        )

        # the loader alone, flat out, no training: its own cost per batch (CPU time is the load-independent figure)
        stream = tr.data.batches(position)
        next(stream)  # the first buffer
        t1, c1 = time.perf_counter(), time.process_time()
        for _ in range(n - 1):
            next(stream)
        alone = ((time.perf_counter() - t1) / (n - 1), (time.process_time() - c1) / (n - 1))
        stream.close()
        runs = {"in-memory": [], "loader": []}
        for r in range(args.rounds):  # ABBA...: a load change on the shared cores hits both ways alike
            for way in ("in-memory", "loader") if r % 2 == 0 else ("loader", "in-memory"):
                source = iter(kept) if way == "in-memory" else tr.data.batches(position)
                res = run_steps(tr, graphdef, host_state, source, args.warmup, args.steps)
                if way == "loader":
                    source.close()  # stops the loader's read-ahead thread
                runs[way].append(res)
                print(
                    f"  round {r + 1} {way:9s}: {res['seconds'] / res['steps']:.3f} s/step, "
                    f"load average {res['load']:.2f}",
                    flush=True,
                )
        tr.ckpt.close()

    total = args.rounds * args.steps
    print(
        f"\n{total} timed steps each way ({args.rounds} runs of {args.steps} after {args.warmup} warm-up steps, "
        f"order ABBA...), batch {args.batch}, d {tr.spec.d_in}, d_sae {tr.spec.d_sae}, k {tr.spec.k}"
    )
    print(f"{'way':10s} {'tokens/s':>9s} {'s/step':>7s} {'CPU s/step':>11s} {'in next() s/step':>17s}")
    step_s = {}
    for way, rs in runs.items():
        sec = sum(r["seconds"] for r in rs)
        step_s[way] = sec / total
        cpu, wait = sum(r["cpu"] for r in rs) / total, sum(r["wait"] for r in rs) / total
        print(f"{way:10s} {total * args.batch / sec:9.0f} {step_s[way]:7.3f} {cpu:11.3f} {wait:17.4f}")
    share = (step_s["loader"] - step_s["in-memory"]) / step_s["loader"]
    print(f"loader share of step time: (t_loader - t_mem) / t_loader = {share:.1%} (target < 10%)")
    print(
        f"loader alone (no training, {n - 1} batches flat out): {alone[0]:.4f} s/batch, {alone[1]:.4f} CPU s/batch "
        f"= {alone[1] / step_s['in-memory']:.2%} of an in-memory step even if it never overlapped the step"
    )
    all_losses = [r["losses"] for rs in runs.values() for r in rs]
    diff = max(float(np.max(np.abs(v - all_losses[0]))) for v in all_losses)
    print(f"same batches in every run: max |loss difference| over {len(all_losses[0])} steps = {diff:.3g}")


if __name__ == "__main__":
    main()
