"""Shuffled-loader throughput from an S3 run folder next to the same store on local disk.

    .venv/bin/python bench/remote_loader.py                        # moto's S3 server on localhost
    .venv/bin/python bench/remote_loader.py --endpoint URL --bucket B   # a real S3 / MinIO endpoint

Builds the synthetic store of bench/loader.py (bf16, d = 896) on local disk, copies its files to
s3://BUCKET/harvest-bench-remote/ (byte for byte: the same commit records, shards and chunks), then
times one shuffled epoch of `store.batches` on each, after one untimed warm-up epoch (page cache,
zarr metadata, S3 connections). On S3 every inner chunk is one ranged GET, so the loader's `workers`
(concurrent chunk reads) matter there: it is run with several. With moto the server is a Python
process on the same machine: this measures harvest's remote read path plus moto, not S3 itself.
moto reads a whole object to answer a ranged GET (a 3 MB range costs 15 ms from a 4 MB object, 120 ms
from a 128 MB one), so run it with --shard-mb 8 too to see the read path without that artifact.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader import HOOK, build, timed  # noqa: E402

from harvest.data import open_store  # noqa: E402

_SERVE = (
    "import logging, sys\nfrom moto.server import ThreadedMotoServer\n"
    "logging.getLogger('werkzeug').setLevel(logging.ERROR)\n"
    "s = ThreadedMotoServer(ip_address='127.0.0.1', port=int(sys.argv[1]), verbose=False)\ns.start()\n"
    "sys.stdin.read()\n"
)


def moto() -> tuple[str, subprocess.Popen]:
    """moto's S3 server in a child process (its CPU then does not compete with the reader's GIL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", _SERVE, str(port)], stdin=subprocess.PIPE)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return f"http://127.0.0.1:{port}", server
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto's server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", help="the local copy, built if absent (default: /tmp/harvest-bench-remote-<shard-mb>)")
    ap.add_argument("--mb", type=int, default=128, help="activation MB of the synthetic store")
    ap.add_argument("--shard-mb", type=float, default=128, help="shard size (harvest's default: 128)")
    ap.add_argument("--endpoint", help="an S3 endpoint URL; default: start moto's server")
    ap.add_argument("--bucket", default="harvest-bench")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--workers", default="2,8,16", help="loader chunk-read threads to try on S3")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    server = None
    if args.endpoint is None:
        args.endpoint, server = moto()
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    os.environ["AWS_ENDPOINT_URL"] = args.endpoint
    try:
        path = Path(args.path or f"/tmp/harvest-bench-remote-{args.shard_mb:g}")
        if not (path / "commits").is_dir():
            print(f"building a {args.mb} MB bf16 d=896 store in {path} ...", flush=True)
            build(path, args.mb, 896, "blosc-zstd", shard_mb=args.shard_mb)
        from harvest.store.location import URL
        from harvest.store.objectstore import files_for

        url = URL(f"s3://{args.bucket}/harvest-bench-remote")
        files = files_for(url)
        if not files.exists(URL(f"s3://{args.bucket}")):
            files.fs.mkdir(args.bucket)
        files.remove(url)
        t0 = time.perf_counter()
        rels = [p.relative_to(path).as_posix() for p in sorted(path.rglob("*")) if p.is_file()]
        files.upload(path, url, rels)
        print(f"uploaded {len(rels)} files to {url} in {time.perf_counter() - t0:.1f} s ({args.endpoint})")

        local, remote = open_store(path), open_store(url)
        d, item = local.hook_widths[HOOK], local.hook_dtype(HOOK).itemsize
        print(
            f"{local!r}\ncores: {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.2f}, "
            f"{local.num_tokens * d * item / 1e6:.0f} MB of activations, chunk rows {local.chunk_index(HOOK)[0].stop}"
        )

        def epoch(store, workers: int):
            return lambda: sum(len(x) for x in store.batches(HOOK, args.batch, seed=0, exclude=(), workers=workers))

        runs = [("local disk", local, 2)] + [("s3", remote, int(w)) for w in args.workers.split(",")]
        print(f"\n{'store':12s} {'workers':>7s} {'seconds':>8s} {'GB/s':>7s} {'CPU s/GB':>9s}")
        for name, store, workers in runs:
            sec, cpu, rows = timed(epoch(store, workers), args.repeat)
            assert rows == store.num_tokens
            gb = rows * d * item / 1e9
            print(f"{name:12s} {workers:7d} {sec:8.3f} {gb / sec:7.2f} {cpu / gb:9.2f}")
        print("(GB/s in stored bf16 bytes, one shuffled epoch; CPU s/GB: this process, all threads)")
    finally:
        if server is not None:
            server.stdin.close()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
