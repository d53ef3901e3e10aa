"""Read-path backends on format-v2 shards: our direct chunk reader vs TensorStore zarr3 vs zarr-python.

    .venv/bin/python bench/reader_backends.py                  # d = 896 and 4864, 8 shards of 64 MiB each
    .venv/bin/python bench/reader_backends.py --widths 896 --shards 4 --threads 1 2

Writes v2-layout shards (inner codecs bytes, blosc-zstd, crc32c; write_empty_chunks) to --out, reads
every inner chunk once in a seeded random (shard, chunk) order into preallocated uint16 buffers and
prints GB/s of decoded bytes (best of --repeat after one warm-up pass: page cache warm) and CPU s/GB.
"cold" is one first pass after POSIX_FADV_DONTNEED on the scratch files only. Then checks corruption
handling on a copy of one shard, and deletes --out.
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib.metadata
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import ml_dtypes
import numcodecs.blosc
import numpy as np
import tensorstore as ts
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

from harvest.store.shard import BLOSC_BLOCKSIZE, chunk_rows

MISSING = 2**64 - 1
IN_FLIGHT = 16
numcodecs.blosc.use_threads = False  # blosc decodes on the calling thread only, as in the loader's workers


# ---------------------------------------------------------------- data


def write_shards(root: Path, d: int, n_shards: int, rows: int, seed: int = 0) -> list[Path]:
    """n_shards arrays [rows, d] of bf16 bits laid out like format v2 -> the array directories."""
    rng = np.random.default_rng(seed)
    scale = rng.lognormal(0.0, 0.5, d).astype(np.float32)  # [d]
    scale[rng.choice(d, 4, replace=False)] *= 100  # a few massive dimensions
    crows = min(chunk_rows(d, 2), rows)
    paths = []
    for k in range(n_shards):
        data = (rng.standard_normal((rows, d), dtype=np.float32) * scale).astype(ml_dtypes.bfloat16).view(np.uint16)
        path = root / f"d{d}" / f"{k:06d}.zarr" / "acts" / "h"
        arr = zarr.create_array(
            str(path),
            shape=data.shape,
            dtype=np.uint16,
            chunks=(crows, d),
            shards=(-(-rows // crows) * crows, d),
            serializer=BytesCodec(),
            compressors=[
                BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=2, blocksize=BLOSC_BLOCKSIZE),
                Crc32cCodec(),
            ],
            fill_value=0,
            config={"write_empty_chunks": True},
        )
        arr[...] = data
        paths.append(path)
    return paths


def shard_index(path: Path, n_chunks: int) -> np.ndarray:
    """[n_chunks, 2] (offset, nbytes) from the index at the end of c/0/0 (index codecs bytes + crc32c)."""
    with open(path / "c" / "0" / "0", "rb") as f:
        f.seek(-(16 * n_chunks + 4), os.SEEK_END)
        raw = f.read()
    if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise ValueError(f"{path}: shard index checksum mismatch")
    return np.frombuffer(raw[:-4], dtype="<u8").reshape(n_chunks, 2)


def evict(paths: list[Path]) -> None:
    """Drop only these files' pages from the page cache (no global cache drop)."""
    for p in paths:
        fd = os.open(p / "c" / "0" / "0", os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


# ---------------------------------------------------------------- backends: run(order, bufs, threads)


def over_units(one, n: int, threads: int) -> None:
    """one(i) for i < n: in this thread, or on a pool of `threads` (like the loader's workers)."""
    if threads == 1:
        list(map(one, range(n)))
    else:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(one, range(n)))


class Direct:
    """pread + (crc32c of the last 4 bytes) + numcodecs.blosc.decompress into the destination."""

    def __init__(self, paths, rows, crows, d, crc=True):
        self.files = [str(p / "c" / "0" / "0") for p in paths]
        self.index = [shard_index(p, -(-rows // crows)) for p in paths]
        self.fds = [os.open(f, os.O_RDONLY) for f in self.files]
        self.rows, self.crows, self.d, self.crc = rows, crows, d, crc

    def read_into(self, k: int, c: int, out: np.ndarray) -> None:
        off, nbytes = (int(v) for v in self.index[k][c])
        if off == MISSING:
            out[...] = 0
            return
        src = os.pread(self.fds[k], nbytes, off)
        body = np.frombuffer(src, np.uint8)[:-4]  # no copy
        if self.crc and google_crc32c.value(body) != int.from_bytes(src[-4:], "little"):
            raise ValueError(f"{self.files[k]}: chunk {c} checksum mismatch")
        full = out.shape[0] == self.crows
        dest = out if full else np.empty((self.crows, self.d), np.uint16)  # the padded last chunk
        numcodecs.blosc.decompress(body, dest)
        if not full:
            out[...] = dest[: len(out)]

    def run(self, order, bufs, threads):
        def one(i):
            k, c, a, b = order[i]
            self.read_into(k, c, bufs[i % len(bufs)][: b - a])

        over_units(one, len(order), threads)


def ts_open(path: Path, ctx: ts.Context):
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    return ts.open(spec, context=ctx, read=True).result()


class TStore:
    """arr[a:b].read() per unit, `in_flight` reads outstanding, copied into the destination; or with
    into=True, dest.write(arr[a:b]) on a ts.array view of the destination buffer (no extra copy)."""

    def __init__(self, paths, limit, in_flight, into=False):
        lim = {"limit": limit}  # one context for all shards: its limits are global, not per shard
        ctx = ts.Context() if limit is None else ts.Context({"data_copy_concurrency": lim, "file_io_concurrency": lim})
        self.arrs = [ts_open(p, ctx) for p in paths]
        self.in_flight, self.into = in_flight, into

    def run(self, order, bufs, threads):
        dests = [ts.array(b, copy=False, write=True) for b in bufs] if self.into else None
        pending = collections.deque()

        def finish(j, n, fut):
            r = fut.result()
            if not self.into:
                bufs[j % len(bufs)][:n] = r

        for i, (k, _c, a, b) in enumerate(order):
            src = self.arrs[k][a:b]
            pending.append((i, b - a, dests[i % len(bufs)][: b - a].write(src) if self.into else src.read()))
            if len(pending) >= self.in_flight:
                finish(*pending.popleft())
        for p in pending:
            finish(*p)


class Zarr:
    def __init__(self, paths):
        self.arrs = [zarr.open_array(str(p), mode="r") for p in paths]

    def run(self, order, bufs, threads):
        def one(i):
            k, _c, a, b = order[i]
            bufs[i % len(bufs)][: b - a] = self.arrs[k][a:b]

        over_units(one, len(order), threads)


BACKENDS = {  # name -> (shard array paths, (rows, chunk rows, d), threads) -> backend
    "direct+crc": lambda p, g, t: Direct(p, *g),
    "direct, no crc": lambda p, g, t: Direct(p, *g, crc=False),
    "ts 1 in flight": lambda p, g, t: TStore(p, t, 1),
    f"ts {IN_FLIGHT} in flight": lambda p, g, t: TStore(p, t, IN_FLIGHT),
    f"ts {IN_FLIGHT} in flight, write into buf": lambda p, g, t: TStore(p, t, IN_FLIGHT, into=True),
    f"ts {IN_FLIGHT} in flight, default ctx": lambda p, g, t: TStore(p, None, IN_FLIGHT),
    "zarr-python": lambda p, g, t: Zarr(p),
}


# ---------------------------------------------------------------- measurement


def measure(runs: dict, repeat: int) -> dict:
    """key -> (best seconds, CPU seconds of that pass); one untimed warm-up pass each, then `repeat`
    rounds that time every run once, interleaved so load from other work hits all of them alike."""
    for fn in runs.values():
        fn()
    out = {k: (float("inf"), 0.0) for k in runs}
    for _ in range(repeat):
        for k, fn in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            out[k] = min(out[k], (time.perf_counter() - t0, time.process_time() - c0))
    return out


def corruption_checks(paths: list[Path], rows: int, crows: int, d: int, scratch: Path) -> list[str]:
    """On copies of shard 0: flip a payload byte / a stored-crc byte of inner chunk 1, delete or
    truncate the shard file; then read chunk 1 with each backend and report what it did."""
    c, a, b = 1, crows, 2 * crows
    off, nbytes = (int(v) for v in shard_index(paths[0], -(-rows // crows))[c])

    def flip(f: Path, pos: int) -> None:
        m = np.memmap(f, np.uint8, "r+")
        m[pos] ^= 1
        m.flush()

    def read_direct(p: Path) -> np.ndarray:
        out = np.empty((crows, d), np.uint16)
        Direct([p], rows, crows, d).read_into(0, c, out)
        return out

    damages = {
        "payload byte flipped": lambda f: flip(f, off + nbytes // 2),
        "stored crc byte flipped": lambda f: flip(f, off + nbytes - 2),
        "shard file deleted": os.unlink,
        "shard file truncated to half": lambda f: os.truncate(f, f.stat().st_size // 2),
    }
    readers = {
        "tensorstore": lambda p: ts_open(p, ts.Context())[a:b].read().result(),
        "direct+crc": read_direct,
        "zarr-python": lambda p: zarr.open_array(str(p), mode="r")[a:b],
    }
    out = []
    for i, (what, damage) in enumerate(damages.items()):
        dst = scratch / "corrupt" / str(i)
        shutil.copytree(paths[0], dst)
        damage(dst / "c" / "0" / "0")
        for name, read in readers.items():
            try:
                msg = f"returned data, all zeros: {bool((read(dst) == 0).all())}"
            except Exception as e:  # report whatever each backend raises
                msg = f"raised {type(e).__name__}: {str(e).splitlines()[0][:140]}"
            out.append(f"  {what + ', ' + name + ':':42s} {msg}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[896, 4864])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-mb", type=float, default=64, help="raw MiB of bf16 activations per shard")
    ap.add_argument("--rows-per-shard", type=int, default=None, help="overrides --shard-mb")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/harvest-bench-backends"))
    args = ap.parse_args()
    print(
        f"tensorstore {importlib.metadata.version('tensorstore')}, zarr {zarr.__version__}, "
        f"numcodecs {numcodecs.__version__}, cores {len(os.sched_getaffinity(0))}, load {os.getloadavg()[0]:.2f}"
    )
    shutil.rmtree(args.out, ignore_errors=True)
    results, cold, checks = {}, {}, []
    try:
        for d in args.widths:
            rows = args.rows_per_shard or int(args.shard_mb * 2**20 // (d * 2))
            crows = min(chunk_rows(d, 2), rows)
            t0 = time.perf_counter()
            paths = write_shards(args.out, d, args.shards, rows, args.seed)
            disk = sum(f.stat().st_size for p in paths for f in (p / "c" / "0").iterdir())
            units = [(k, c, c * crows, min((c + 1) * crows, rows)) for k in range(len(paths))
                     for c in range(-(-rows // crows))]  # fmt: skip
            order = [units[i] for i in np.random.default_rng(args.seed).permutation(len(units))]
            gb = rows * d * 2 * len(paths) / 1e9
            print(
                f"d={d}: {len(paths)} shards x {rows} rows, {crows}-row chunks, {len(units)} units, "
                f"{gb:.2f} GB raw, {disk / 1e9:.2f} GB on disk ({disk / gb / 1e9:.2f}), "
                f"written in {time.perf_counter() - t0:.0f}s",
                flush=True,
            )
            bufs = [np.empty((crows, d), np.uint16) for _ in range(2 * IN_FLIGHT)]
            # same bits from every backend, on a sample of units
            ref, tsr, zr = Direct(paths, rows, crows, d), TStore(paths, None, 1), Zarr(paths)
            for k, c, a, b in order[:: max(1, len(order) // 12)]:
                x = np.empty((b - a, d), np.uint16)
                ref.read_into(k, c, x)
                assert np.array_equal(x, tsr.arrs[k][a:b].read().result()) and np.array_equal(x, zr.arrs[k][a:b])
            t_max = max(args.threads)
            runs = {
                (name, t): functools.partial(make(paths, (rows, crows, d), t).run, order, bufs, t)
                for name, make in BACKENDS.items()
                for t in ([t_max] if "default" in name else args.threads)
            }
            for key in [("direct+crc", t_max), (f"ts {IN_FLIGHT} in flight", t_max)]:
                evict(paths)
                t0 = time.perf_counter()
                runs[key]()
                cold[(*key, d)] = gb / (time.perf_counter() - t0)
            for (name, t), (sec, cpu) in measure(runs, args.repeat).items():
                results[(name, d, t)] = (gb / sec, cpu / gb)
                print(f"  {name:32s} t={t} {gb / sec:6.2f} GB/s  {cpu / gb:5.2f} CPU s/GB", flush=True)
            if not checks:
                checks = corruption_checks(paths, rows, crows, d, args.out)
            shutil.rmtree(args.out / f"d{d}")
    finally:
        shutil.rmtree(args.out, ignore_errors=True)

    names = list(dict.fromkeys(n for n, _, _ in results))
    head = "".join(f" | d={d}: GB/s  x direct  CPU s/GB" for d in args.widths)
    print(f"\n{'backend':32s} {'t':>2s}{head}")
    for name in names:
        for t in sorted({t for n, _, t in results if n == name}):
            row = f"{name:32s} {t:2d}"
            for d in args.widths:
                rate, cpu = results[(name, d, t)]
                base = results[("direct+crc", d, t)][0]
                row += f" |    {rate:6.2f}  {rate / base:7.2f}  {cpu:8.2f}"
            print(row)
    print("(t: Python threads for direct/zarr; data_copy and file_io concurrency limits for ts)")
    for d in args.widths:
        rd, _, td = max((r[0], n, t) for (n, d2, t), r in results.items() if d2 == d and n == "direct+crc")
        rt, nt, tt = max((r[0], n, t) for (n, d2, t), r in results.items() if d2 == d and n.startswith("ts"))
        print(f"d={d}: best direct+crc {rd:.2f} GB/s (t={td}), best ts {rt:.2f} ({nt}, t={tt}): {rt / rd:.2f}x")
    for (name, t, d), rate in cold.items():
        print(f"cold-ish first pass (own pages evicted) d={d} {name} t={t}: {rate:.2f} GB/s")
    print("\ncorruption / missing data (copy of shard 0, inner chunk 1):")
    print("\n".join(checks))


if __name__ == "__main__":
    main()
