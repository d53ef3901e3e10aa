"""Reading whole inner chunks of a shard's activation arrays, without zarr where the layout allows.

docs/FORMAT.md fixes the layout (one sharding object per array, index at the end, inner chunks of
whole rows), so the loader can pread each chunk (a ranged GET on an object store) and decode it
straight into its own buffer: zarr-python costs about 1 ms and one copy per chunk, which caps a
shuffled loader well below 1 GB/s. Anything else falls back to zarr.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path

import numcodecs.blosc
import numcodecs.zstd
import numpy as np

from harvest.store.integrity import crc32c_bytes
from harvest.store.location import URL
from harvest.store.reader import ChunkRef, StoreReader, data_file

_MISSING = 2**64 - 1  # shard index entry of a chunk that was never written (version 1: the fill value 0)


@dataclasses.dataclass(frozen=True)
class _Direct:
    """One hook of one shard, read without zarr: the shard object's index, then pread + one codec call
    per inner chunk, decoded straight into the caller's buffer (zarr costs ~1 ms and a copy per chunk)."""

    path: Path | URL  # the shard object acts/<hook>/c/0/0
    index: np.ndarray  # [chunks, 2] uint64 (offset, nbytes)
    rows: int  # rows per inner chunk
    shape: tuple  # (n, d)
    dtype: np.dtype  # storage dtype
    codec: str  # "blosc" | "zstd" | "none"
    checked: bool  # each chunk ends with the crc32c of its bytes (format version 2)


def _direct(store: StoreReader, k: int, hook: str) -> _Direct | None:
    """The direct-read plan for the layout FORMAT.md describes, or None (then zarr reads it)."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ShardingCodecIndexLocation, ZstdCodec

    arr = store.array(k, f"acts/{hook}")
    m = arr.metadata
    (sc,) = m.codecs if len(m.codecs) == 1 else (None,)
    if (
        not isinstance(sc, ShardingCodec)
        or sc.index_location != ShardingCodecIndexLocation.end
        or [type(c) for c in sc.index_codecs] != [BytesCodec, Crc32cCodec]
        or getattr(m.chunk_key_encoding, "separator", None) != "/"
        or m.fill_value != 0
        or arr.shards[0] < arr.shape[0]
        or arr.chunks[1] != arr.shape[1]
        or arr.dtype.byteorder == ">"
    ):
        return None
    inner = [type(c) for c in sc.codecs]
    checked = inner[-1:] == [Crc32cCodec]
    codec = {(BytesCodec,): "none", (BytesCodec, BloscCodec): "blosc", (BytesCodec, ZstdCodec): "zstd"}.get(
        tuple(inner[:-1] if checked else inner)
    )
    path = store.shards[k].path / "acts" / hook / "c" / "0" / "0"
    if codec is None:
        return None
    files = store.files
    if not files.is_file(path):
        if checked:  # version 2 writes every file: a missing one is damage, never "all zeros"
            raise store.damaged(k, data_file(f"acts/{hook}"), "file is missing")
        return None  # version 1: zarr reads it as the fill value, as it always did
    n_chunks = arr.shards[0] // arr.chunks[0]
    raw = files.read_tail(path, 16 * n_chunks + 4)
    if crc32c_bytes(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        return None  # let zarr report the corruption
    index = np.frombuffer(raw[:-4], dtype="<u8").reshape(n_chunks, 2)
    return _Direct(path, index, arr.chunks[0], arr.shape, np.dtype(arr.dtype), codec, checked)


def _decode(plan: _Direct, pread: Callable[[int, int], bytes], c: int, out: np.ndarray) -> None:
    off, nbytes = (int(v) for v in plan.index[c])
    if off == _MISSING:
        if plan.checked:  # version 2 writes every chunk
            raise ValueError(f"inner chunk {c} is missing from the shard index")
        out[...] = 0
        return
    src = pread(nbytes, off)
    if len(src) != nbytes:
        raise ValueError(f"inner chunk {c} is cut short ({len(src)} of {nbytes} bytes)")
    if plan.checked:
        src = memoryview(src)
        if crc32c_bytes(src[:-4]) != int.from_bytes(src[-4:], "little"):
            raise ValueError(f"inner chunk {c} fails its crc32c checksum")
        src = src[:-4]
    full = out.shape[0] == plan.rows
    dest = out if full else np.empty((plan.rows, plan.shape[1]), plan.dtype)  # the padded last chunk
    if plan.codec == "blosc":
        numcodecs.blosc.decompress(src, dest)
    elif plan.codec == "zstd":
        numcodecs.zstd.decompress(src, dest)
    else:
        dest.reshape(-1).view(np.uint8)[...] = np.frombuffer(src, np.uint8)
    if not full:
        out[...] = dest[: len(out)]


class ChunkReader:
    """Reads row ranges aligned to inner chunks as storage bits, directly when the layout allows."""

    def __init__(self, store: StoreReader, hooks: Iterable[str]):
        self.store = store
        hooks = list(hooks)
        self.plans = {(k, h): _direct(store, k, h) for h in hooks for k in range(len(store.shards))}
        # the storage dtype of each hook, looked up once: read() runs for every chunk of a stats pass
        self.dtypes = {h: storage_bits(np.empty(0, store.hook_dtype(h))).dtype for h in hooks}

    def read_into(self, hook: str, unit: ChunkRef, out: np.ndarray) -> None:
        """out: [unit.stop - unit.start, d] storage dtype."""
        plan = self.plans[(unit.shard, hook)]
        if plan is None:
            out[...] = storage_bits(self.store.read_rows(hook, unit.shard, unit.start, unit.stop))
            return
        with self.store.reading(unit.shard, data_file(f"acts/{hook}")), self.store.files.ranges(plan.path) as pread:
            for a in range(unit.start, unit.stop, plan.rows):  # several chunks if this hook's are smaller
                b = min(a + plan.rows, unit.stop)
                _decode(plan, pread, a // plan.rows, out[a - unit.start : b - unit.start])

    def dtype(self, hook: str) -> np.dtype:
        """The storage dtype (bfloat16 as uint16 bits)."""
        return self.dtypes[hook]

    def read(self, hook: str, unit: ChunkRef) -> np.ndarray:
        """-> [unit.stop - unit.start, d] storage dtype."""
        out = np.empty((unit.stop - unit.start, self.store.hook_widths[hook]), self.dtypes[hook])
        self.read_into(hook, unit, out)
        return out


def storage_bits(x: np.ndarray) -> np.ndarray:
    # numpy moves uint16 rows faster than the bfloat16 extension dtype
    return x.view(np.uint16) if x.dtype.name == "bfloat16" else x
