"""Writing an activation array's one storage object (`acts/<hook>/c/0/0`) without zarr's write path,
with its inner chunks compressed in parallel: the writer-side twin of `chunks.py`.

zarr-python encodes a shard's inner chunks one after another on its event-loop thread, at about a
third of the codec's own speed (0.29 GB/s for blosc-zstd where numcodecs alone does 1.07 GB/s per
core, bf16 d=896 on this CPU), and more threads do not help. The layout is fixed by docs/FORMAT.md,
so the writer builds the object itself: each inner chunk is the bytes codec's little-endian rows,
compressed with the array's compressor (numcodecs, which releases the GIL), then the crc32c of the
compressed bytes; then the shard index ([chunks, 2] uint64 offset/nbytes) and its crc32c. zarr writes
the array's metadata; every test reads these objects back through zarr and TensorStore.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numcodecs
import numpy as np

from harvest.store.integrity import crc32c_bytes


def compressor(codec: str, level: int, itemsize: int, blocksize: int):
    """The numcodecs codec equal to the zarr compressor of shard._compressors (None for "none")."""
    if codec == "none":
        return None
    if codec == "zstd":
        return numcodecs.Zstd(level=level, checksum=False)
    # zarr hands blosc the chunk as raw bytes, with typesize from the codec's config: do the same
    return numcodecs.Blosc(cname="zstd", clevel=level, shuffle=numcodecs.Blosc.SHUFFLE, blocksize=blocksize,
                           typesize=itemsize)  # fmt: skip


def _encode(data: np.ndarray, start: int, rows: int, codec) -> tuple[np.ndarray | bytes, bytes]:
    """Inner chunk rows [start, start + rows) of data [n, d], zero-padded to `rows` -> (encoded bytes,
    their crc32c): the two parts of the stored chunk, written one after the other (no joining copy)."""
    part = data[start : start + rows]  # [<= rows, d]
    if len(part) < rows:  # zarr's regular grid pads the last chunk with the fill value
        part = np.concatenate([part, np.zeros((rows - len(part), data.shape[1]), data.dtype)])
    raw = np.ascontiguousarray(part).reshape(-1).view(np.uint8)  # a view of data for every full chunk
    out = raw if codec is None else codec.encode(raw)
    return out, crc32c_bytes(out if isinstance(out, bytes) else memoryview(out)).to_bytes(4, "little")


def write_shard_object(path: Path, data: np.ndarray, rows: int, codec, pool: ThreadPoolExecutor | None) -> int:
    """Write data [n, d] as the sharding object of an array whose inner chunks are (rows, d) and whose one
    shard holds every row. Inner chunks are encoded on `pool` (in order of offset). -> bytes written."""
    if sys.byteorder != "little":
        raise NotImplementedError("the bytes codec stores little-endian rows; this writer runs on little-endian hosts")
    starts = range(0, len(data), rows)
    encode = lambda a: _encode(data, a, rows, codec)  # noqa: E731
    sizes = []
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        # written as they come, in order: the index is at the end, so no chunk waits for the others
        for c, crc in pool.map(encode, starts) if pool is not None else map(encode, starts):
            f.write(c)
            f.write(crc)
            sizes.append(memoryview(c).nbytes + 4)
        sizes = np.array(sizes, np.uint64)
        index = np.stack([np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.uint64), sizes], 1)  # [chunks, 2]
        index_bytes = index.astype("<u8").tobytes()
        f.write(index_bytes)
        f.write(crc32c_bytes(index_bytes).to_bytes(4, "little"))
    return int(sizes.sum()) + len(index_bytes) + 4


def default_threads() -> int:
    """Compression threads per shard: every core the process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0))))
