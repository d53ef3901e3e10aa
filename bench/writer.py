"""The writer alone, and the harvest with its writer on and off, side by side.

    python bench/writer.py                       # writer alone: codecs x widths x threads (~1 min)
    python bench/writer.py --harvest [--model DIR] [--tasks 8] [--new 64]   # + writer on/off in a real harvest

Writer alone: one 128 MiB bf16 shard (realistic activations: Gaussian x per-dimension log-normal
scales, a few 100x dimensions) written by harvest's ShardWriter, whose activation objects are built
by harvest.store.shardfile (inner chunks compressed on a thread pool), next to zarr-python writing
the same arrays itself. Printed: GB/s of raw bf16 through the whole shard write (build, checksum
manifest, rename, commit; fsync off) and GB/s per CPU-second (process CPU time, all threads), which
is what sizing needs: cores per GB/s = 1 / (GB/s per CPU-second).

--harvest: the same harvest twice after a warm-up (compiled programs cached in memory): the whole
pipeline (engine + record building + writer + commits), and the engine alone (the same stream, its
results dropped), so the writer's cost is the difference.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harvest.store.shard import _ARRAY_CONFIG, SequenceRecord, ShardWriter, _compressors, chunk_rows  # noqa: E402

REAL = os.path.expanduser("~/.cache/harvest-fixtures/qwen2.5-coder-0.5b-instruct")


def activations(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = rng.lognormal(0.0, 0.5, d).astype(np.float32)  # [d]
    scale[rng.choice(d, 4, replace=False)] *= 100
    return rng.standard_normal((n, d), dtype=np.float32) * scale  # [n, d]


def record(n: int, hooks: dict[str, int]) -> SequenceRecord:
    tokens = {"token_id": np.zeros(n, np.int32), "position": np.arange(n, dtype=np.int32),
              "phase": np.zeros(n, np.int8), "segment": np.zeros(n, np.int8), "example": np.full(n, -1, np.int16),
              "row": np.full(n, -1, np.int16), "col": np.full(n, -1, np.int16)}  # fmt: skip
    acts = {h: activations(n, d, i) for i, (h, d) in enumerate(hooks.items())}
    return SequenceRecord({"sequence_id": 0}, tokens, acts)


def timed(fn) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def writer_alone(threads: list[int], repeat: int) -> None:
    print(f"cores: {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.2f}; one 128 MiB bf16 shard")
    print(f"{'width x hooks':14s} {'codec':11s} {'writer':16s} {'GB/s':>6s} {'GB/s/CPU-s':>11s} {'ratio':>6s}")
    for d, n_hooks in ((896, 3), (4864, 1)):
        hooks = {f"blocks.{i}.hook_resid_post": d for i in range(n_hooks)}
        n = (128 << 20) // (2 * d * n_hooks)
        for codec in ("blosc-zstd", "zstd", "none"):
            results = {}
            for name in ["zarr-python", *(f"harvest, {t} thr" for t in threads)]:
                best = (float("inf"), 0.0)
                for _ in range(repeat):
                    tmp = Path(tempfile.mkdtemp(prefix="harvest-bench-writer-"))
                    best = min(best, one_write(name, tmp, n, hooks, codec))
                    shutil.rmtree(tmp)
                results[name] = best
            base = results["zarr-python"][0]
            for name, (wall, cpu) in results.items():
                gb = n * d * n_hooks * 2 / 1e9
                print(f"{f'{d} x {n_hooks}':14s} {codec:11s} {name:16s} {gb / wall:6.2f} {gb / cpu:11.2f} "
                      f"{base / wall:6.2f}")  # fmt: skip


def one_write(name: str, tmp: Path, n: int, hooks: dict[str, int], codec: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one shard write by `name` ("zarr-python" or "harvest, T thr")."""
    if name == "zarr-python":
        rec = record(n, hooks)
        return timed(lambda: zarr_write(tmp, rec, codec))
    sw = ShardWriter(tmp, hooks, "bfloat16", codec, fsync=False, threads=int(name.split()[1]))
    rec = sw.prepare_record(record(n, hooks))
    return timed(lambda: sw.write(0, [rec]))


def zarr_write(root: Path, rec: SequenceRecord, codec: str) -> None:
    """The same activation arrays written by zarr-python itself (the path harvest used before)."""
    import ml_dtypes
    import zarr

    g = zarr.open_group(str(root), mode="w", zarr_format=3)
    for hook, x in rec.acts.items():
        bits = x.astype(ml_dtypes.bfloat16).view(np.uint16)  # [n, d]
        rows = chunk_rows(bits.shape[1], 2)
        g.create_array(hook, shape=bits.shape, dtype=np.uint16, chunks=(rows, bits.shape[1]),
                       shards=(-(-len(bits) // rows) * rows, bits.shape[1]), compressors=_compressors(codec, 1, 2),
                       config=_ARRAY_CONFIG)[...] = bits  # fmt: skip


def harvest_on_off(model: str, tasks: int, new: int) -> None:
    from harvest.cli import pipeline
    from harvest.cli.config import from_dict

    with tempfile.TemporaryDirectory() as tmp:
        raw = {
            "model": {"path": model, "dtype": "float32"},
            "data": {"limit": tasks, "max_prompt_tokens": 1024},
            "generation": {"max_new_tokens": new},
            "capture": {
                "hooks": ["blocks.6.hook_resid_post", "blocks.12.hook_resid_post", "blocks.18.hook_resid_post"],
                "dtype": "bfloat16",
            },  # fmt: skip
            "runtime": {"progress": False, "compile_cache": None},
            "output": {"path": f"{tmp}/run"},
        }
        cfg = from_dict(raw)
        work = pipeline.prepare(cfg)  # one Generator: its compiled programs serve every pass below
        items = [(s.sequence_id, work.prompts[s.sequence_id].token_ids) for s in pipeline.admission_order(work)]
        list(work.generator.stream(items))  # warm-up: compiles
        rows = []
        for _ in range(2):
            t = time.perf_counter()
            n_tok = sum(d.prompt_length + len(d.tokens) for d in work.generator.stream(items))
            off = time.perf_counter() - t
            shutil.rmtree(f"{tmp}/run", ignore_errors=True)
            t = time.perf_counter()
            pipeline.run(cfg, overwrite=True, work=work)
            on = time.perf_counter() - t
            rows.append((off, on))
        off, on = min(r[0] for r in rows), min(r[1] for r in rows)
        print(f"\nharvest {model}: {len(items)} sequences, {n_tok:,} tokens, 3 hooks x 896 bf16")
        print(f"engine alone (writer off): {off:.1f} s, {n_tok / off:,.0f} tok/s")
        print(f"whole pipeline (writer on): {on:.1f} s, {n_tok / on:,.0f} tok/s; the writer adds {on / off - 1:+.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="writer thread counts to measure")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--harvest", action="store_true", help="also time a real harvest with the writer on and off")
    ap.add_argument("--model", default=REAL if os.path.isdir(REAL) else "random:0.5b")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    writer_alone([int(t) for t in args.threads.split(",")], args.repeat)
    if args.harvest:
        harvest_on_off(args.model, args.tasks, args.new)


if __name__ == "__main__":
    main()
