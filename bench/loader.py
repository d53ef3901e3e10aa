"""Shuffled-loader throughput next to a raw sequential zarr read and np.load of the same bytes.

    .venv/bin/python bench/loader.py                       # builds /tmp/harvest-bench-loader (~300 MB)
    .venv/bin/python bench/loader.py --path RUN --hook H   # an existing store

The synthetic store is written by harvest's own BackgroundWriter: bf16, d = 896, Gaussian times
per-dimension log-normal scales (a few 100x dimensions), like the compression table in FORMAT.md.
Every reader runs once untimed first, so all three read from a warm page cache (this measures
decode + copy, not the disk). Bytes are counted in the stored dtype (2 bytes per bf16 value).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harvest.data import open_store  # noqa: E402
from harvest.store.shard import SequenceRecord  # noqa: E402
from harvest.store.writer import BackgroundWriter  # noqa: E402

HOOK = "blocks.6.hook_resid_post"


def build(path: Path, mb: int, d: int, codec: str, seq_len: int = 1024, shard_mb: float = 128) -> None:
    rng = np.random.default_rng(0)
    scale = rng.lognormal(0.0, 0.5, d).astype(np.float32)  # [d]
    scale[rng.choice(d, 4, replace=False)] *= 100  # a few massive dimensions
    n_seq = max(1, mb * 2**20 // (seq_len * d * 2))
    with BackgroundWriter(path, {HOOK: d}, "bfloat16", int(shard_mb * 2**20), codec=codec, fsync=False) as w:
        for sid in range(n_seq):
            n_dec = seq_len // 8
            tokens = {
                "token_id": rng.integers(0, 150_000, seq_len).astype(np.int32),
                "position": np.arange(seq_len, dtype=np.int32),
                "phase": np.repeat(np.int8([0, 1]), [seq_len - n_dec, n_dec]),
                "segment": np.zeros(seq_len, np.int8),
                "example": np.full(seq_len, -1, np.int16),
                "row": np.full(seq_len, -1, np.int16),
                "col": np.full(seq_len, -1, np.int16),
            }
            x = rng.standard_normal((seq_len, d), dtype=np.float32) * scale  # [T, d]
            w.put(SequenceRecord({"sequence_id": sid, "task_id": f"t{sid}"}, tokens, {HOOK: x}))


def timed(fn, repeat: int) -> tuple[float, float, object]:
    """(median wall seconds, mean CPU seconds of this process) of `repeat` runs after one untimed
    warm-up (page cache, zarr metadata). CPU seconds say what the reader costs on a busy machine."""
    out = fn()
    times = []
    cpu0 = time.process_time()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), (time.process_time() - cpu0) / repeat, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default="/tmp/harvest-bench-loader")
    ap.add_argument("--hook", default=HOOK)
    ap.add_argument("--mb", type=int, default=320, help="activation MB of the synthetic store")
    ap.add_argument("--codec", default="blosc-zstd")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--buffer-chunks", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per reader (the median is shown)")
    args = ap.parse_args()
    path = Path(args.path)
    if not (path / "commits").is_dir():
        print(f"building a {args.mb} MB bf16 d=896 store in {path} ...", flush=True)
        build(path, args.mb, 896, args.codec)
    store = open_store(path)
    hook, d = args.hook, store.hook_widths[args.hook]
    item = store.hook_dtype(hook).itemsize
    nbytes = store.num_tokens * d * item
    print(
        f"{store!r}\ncores: {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.2f}, "
        f"{nbytes / 1e6:.0f} MB of activations, "
        f"codec {store.codec['name']}, chunk rows {store.chunk_index(hook)[0].stop}"
    )

    def loader():
        n = 0
        for x in store.batches(
            hook, args.batch, seed=0, exclude=(), workers=args.workers, buffer_chunks=args.buffer_chunks
        ):
            n += len(x)
        return n

    def zarr_seq():  # plain zarr, whole array per shard, no harvest code on the read path
        import zarr

        n = 0
        for sh in store.shards:
            n += len(zarr.open_group(str(sh.path), mode="r")["acts"][hook][:])
        return n

    npy = path.with_name(path.name + ".npy")
    if not npy.is_file():
        np.save(npy, np.asarray(store.activations(hook)[:]).view(np.uint16))  # the same bits

    def npload():
        return len(np.load(npy))

    rows_loader = loader()
    assert rows_loader == store.num_tokens, (rows_loader, store.num_tokens)
    results = [
        (name, *timed(fn, args.repeat))
        for name, fn in [
            ("shuffled loader (harvest)", loader),
            ("zarr sequential read", zarr_seq),
            ("np.load of .npy", npload),
        ]
    ]
    base = results[0][1]
    print(f"\n{'reader':28s} {'seconds':>8s} {'GB/s':>7s} {'Mtok/s':>7s} {'x loader':>9s} {'CPU s/GB':>9s}")
    for name, sec, cpu, rows in results:
        gb = rows * d * item / 1e9
        print(f"{name:28s} {sec:8.3f} {gb / sec:7.2f} {rows / sec / 1e6:7.3f} {base / sec:9.2f} {cpu / gb:9.2f}")
    print(
        "(GB/s in stored bf16 bytes; CPU s/GB: process CPU time per GB, all threads: on c idle cores "
        "a reader can reach at most c / (CPU s/GB) GB/s)"
    )


if __name__ == "__main__":
    main()
