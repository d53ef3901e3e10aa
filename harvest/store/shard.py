"""One shard of a harvest run: an immutable Zarr v3 group, built whole by one writer.

`ShardWriter.write(i, records)` builds `shards/{i:06d}.zarr.tmp-<pid>-<rand>/`, fsyncs it, renames
it to `shards/{i:06d}.zarr`, then writes `commits/{i:06d}.json` via tmp file + rename: the commit
point. On an object store (no rename) it builds the shard in a local staging folder, uploads its
files under their final names, then PUTs the commit record (on S3 only if absent): the same commit
point. A crash at any moment leaves either a committed shard or leftovers that
`harvest.store.runfolder.scan_run` deletes.
docs/FORMAT.md is the public contract.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from harvest import failpoints, floats
from harvest.store.format import (
    CODECS,
    DERIVED_TOKEN_COLUMNS,
    FORMAT_NAME,
    FORMAT_VERSION,
    KIND_DTYPE,
    KIND_FILL,
    OFFSET_COLUMNS,
    PHASES,
    SEQUENCE_COLUMNS,
    STORAGE_DTYPES,
    TOKEN_COLUMNS,
    StoreLayout,
)
from harvest.store.integrity import manifest
from harvest.store.lease import check_held
from harvest.store.location import PreconditionFailed, json_bytes, staging_dir
from harvest.store.runfolder import StoreError, fsync_path, fsync_tree, json_default, tmp_path, write_json_atomic
from harvest.store.shardfile import compressor, default_threads, write_shard_object

DEFAULT_SHARD_BYTES = 128 << 20
DEFAULT_CHUNK_BYTES = 4 << 20  # inner chunk target; rows are rounded down to a power of two
BLOSC_BLOCKSIZE = 1 << 20  # with blosc's default blocksize, byte shuffle gains nothing on bf16


@dataclasses.dataclass
class SequenceRecord:
    """One complete sequence: its table row, its per-token columns and its activations.

    tokens: name -> [n] (TOKEN_COLUMNS); acts: hook name -> [n, width] in compute dtype.
    """

    meta: dict[str, Any]
    tokens: dict[str, np.ndarray]
    acts: dict[str, np.ndarray]

    @property
    def num_tokens(self) -> int:
        return len(self.tokens["position"])


# ---------------------------------------------------------------- codecs and dtypes


def storage_numpy_dtype(storage_dtype: str) -> np.dtype:
    """The dtype of the bits on disk: bfloat16 is kept as uint16 (zarr 3.1 has no bfloat16)."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {storage_dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
    return np.dtype(np.uint16 if storage_dtype == "bfloat16" else storage_dtype)


def to_storage(x: np.ndarray, storage_dtype: str) -> np.ndarray:
    """Cast activations to the on-disk bits (bit-exact when the dtypes match): float16 overflow is refused."""
    try:
        y = floats.cast(x, storage_dtype)
    except floats.FloatOverflowError as e:
        raise StoreError(str(e)) from None
    return y.view(np.uint16) if storage_dtype == "bfloat16" else y


def from_storage(x: np.ndarray, logical_dtype: str | None) -> np.ndarray:
    return x.view(ml_dtypes.bfloat16) if logical_dtype == "bfloat16" else x


def codec_config(codec: str, level: int = 1) -> dict:
    """The codec description recorded in shard attributes and commit records."""
    if codec == "none":
        return {"name": "none"}
    if codec == "zstd":
        return {"name": "zstd", "level": level}
    if codec == "blosc-zstd":
        return {
            "name": "blosc-zstd",
            "cname": "zstd",
            "level": level,
            "shuffle": "shuffle",
            "blocksize": BLOSC_BLOCKSIZE,
        }
    raise ValueError(f"codec {codec!r} is not one of {', '.join(CODECS)}")


def _compressors(codec: str, level: int, itemsize: int) -> list:
    """The codec chain after the bytes codec; the crc32c of the compressed bytes always comes last."""
    if codec == "none":
        return [Crc32cCodec()]
    if codec == "zstd":
        return [ZstdCodec(level=level), Crc32cCodec()]
    # typesize must equal the element size or byte shuffle groups the wrong bytes
    blosc = BloscCodec(cname="zstd", clevel=level, shuffle="shuffle", typesize=itemsize, blocksize=BLOSC_BLOCKSIZE)
    return [blosc, Crc32cCodec()]


# Every chunk is written, zeros included: in a version-2 shard a chunk missing from its shard index
# is damage, never "all fill value".
_ARRAY_CONFIG = {"write_empty_chunks": True}


def chunk_rows(width: int, itemsize: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per inner chunk: the largest power of two whose chunk (rows, width) fits chunk_bytes."""
    rows = max(1, chunk_bytes // (width * itemsize))
    return 1 << (rows.bit_length() - 1)


# ---------------------------------------------------------------- building one shard


_COLUMN_THREADS = 8
_SMALL = [ZstdCodec(level=3), Crc32cCodec()]  # token and sequence columns: tiny next to the activations


def _write_column(group: zarr.Group, name: str, col: np.ndarray, dim: str) -> None:
    """One per-token or per-sequence column [n], as one chunk, labelled `dim` for xarray (docs/FORMAT.md)."""
    dtype = str if col.dtype == object else col.dtype
    group.create_array(
        name, shape=col.shape, dtype=dtype, chunks=(max(len(col), 1),), compressors=_SMALL, config=_ARRAY_CONFIG,
        dimension_names=(dim,),
    )[...] = col  # fmt: skip


def _kind_of(values: list) -> str | None:
    """Infer a column kind from Python/numpy scalars: bool < int < float; anything else is str."""
    kinds = set()
    for v in values:
        if v is None:
            continue
        if isinstance(v, (bool, np.bool_)):
            kinds.add("bool")
        elif isinstance(v, (int, np.integer)):
            kinds.add("int")
        elif isinstance(v, (float, np.floating)):
            kinds.add("float")
        else:
            kinds.add("str")
    if not kinds:
        return None
    if len(kinds) == 1:
        return kinds.pop()
    if kinds <= {"int", "float"}:
        return "float"
    raise StoreError(f"column mixes value kinds {sorted(kinds)}")


def _as_str(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=json_default)


def build_sequence_table(metas: list[dict]) -> dict[str, np.ndarray]:
    """Per-sequence columns: the standard ones with fixed kinds, extras with inferred kinds."""
    names = list(SEQUENCE_COLUMNS) + sorted({k for m in metas for k in m} - set(SEQUENCE_COLUMNS))
    table = {}
    for name in names:
        if name in OFFSET_COLUMNS:
            raise StoreError(f"sequence column {name!r} is reserved")
        values = [m.get(name) for m in metas]
        kind = SEQUENCE_COLUMNS.get(name) or _kind_of(values)
        if kind is None:
            continue  # an extra column that is None everywhere carries nothing
        fill = KIND_FILL[kind]
        values = [fill if v is None else v for v in values]
        if kind == "str":
            table[name] = np.array([_as_str(v) for v in values], dtype=object)
        else:
            table[name] = np.asarray(values, dtype=KIND_DTYPE[kind])
    return table


def validate_record(rec: SequenceRecord, hooks: dict[str, int]) -> None:
    if "sequence_id" not in rec.meta:
        raise StoreError("sequence meta has no 'sequence_id'")
    sid = rec.meta["sequence_id"]
    missing = set(TOKEN_COLUMNS) - set(rec.tokens)
    if missing:
        raise StoreError(f"sequence {sid}: missing token columns {sorted(missing)}")
    n = rec.num_tokens
    for name, col in rec.tokens.items():
        if np.shape(col) != (n,):
            raise StoreError(f"sequence {sid}: token column {name!r} has shape {np.shape(col)}, want ({n},)")
    if set(rec.acts) != set(hooks):
        raise StoreError(f"sequence {sid}: hooks {sorted(rec.acts)} != writer hooks {sorted(hooks)}")
    for name, a in rec.acts.items():
        if np.shape(a) != (n, hooks[name]):
            raise StoreError(f"sequence {sid}: {name} has shape {np.shape(a)}, want ({n}, {hooks[name]})")
    pos = np.asarray(rec.tokens["position"])
    if n > 1 and not np.all(np.diff(pos) > 0):
        raise StoreError(f"sequence {sid}: positions are not strictly increasing")
    if n > 1 and not np.all(np.diff(np.asarray(rec.tokens["phase"])) >= 0):
        raise StoreError(f"sequence {sid}: decode tokens come before prefill tokens")


def _already_committed(index: int) -> str:
    return f"shard {index} is already committed; shards are immutable"


class ShardWriter:
    """Writes one complete shard per `write` call, then commits it. Not thread-safe: one per thread.

    hooks: name -> width. Records passed to `write` must already be validated and their acts
    already cast to storage bits (see `prepare_record`), so the writer thread holds compact data.
    """

    def __init__(
        self,
        run_dir,
        hooks: dict[str, int],
        storage_dtype: str = "bfloat16",
        codec: str = "blosc-zstd",
        codec_level: int = 1,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        fsync: bool = True,
        threads: int | None = None,
    ):
        self.layout = StoreLayout(run_dir)
        self.threads = threads or default_threads()  # inner chunks compressed at once (shardfile)
        self.hooks = dict(hooks)
        self.storage_dtype = storage_dtype
        self.np_dtype = storage_numpy_dtype(storage_dtype)
        self.codec = codec_config(codec, codec_level)  # validates the name
        self.codec_name, self.codec_level = codec, codec_level
        self.chunk_bytes = chunk_bytes
        self.fsync = fsync
        self.files = self.layout.files
        self.files.mkdir(self.layout.shards_dir)
        self.files.mkdir(self.layout.commits_dir)

    def prepare_record(self, rec: SequenceRecord) -> SequenceRecord:
        """Validate and cast to storage bits (halves host RAM for float32 -> bfloat16)."""
        validate_record(rec, self.hooks)
        acts = {k: to_storage(v, self.storage_dtype) for k, v in rec.acts.items()}
        tokens = {k: np.asarray(v) for k, v in rec.tokens.items()}
        return SequenceRecord(dict(rec.meta), tokens, acts)

    def record_bytes(self, rec: SequenceRecord) -> int:
        return rec.num_tokens * sum(self.hooks.values()) * self.np_dtype.itemsize

    def write(self, index: int, records: list[SequenceRecord]) -> dict:
        """Build shard `index` from prepared records under a temp name, rename, commit. -> commit record."""
        if not records:
            raise StoreError("a shard needs at least one sequence")
        final = self.layout.shard_path(index)
        if self.files.exists(self.layout.commit_path(index)):
            raise StoreError(_already_committed(index))
        if self.layout.remote:
            return self._write_remote(index, records)
        tmp = tmp_path(final)
        try:
            info = self._build(tmp, index, records)
            info["files"] = manifest(tmp)  # read back from the page cache: ~15 GB/s of crc32c
            if self.fsync:
                fsync_tree(tmp)
            failpoints.hit("shard.built")
            if final.exists():  # an uncommitted leftover of a crash: never visible, safe to drop
                shutil.rmtree(final)
            os.rename(tmp, final)
            if self.fsync:
                fsync_path(final.parent, directory=True)
            failpoints.hit("shard.renamed")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self._commit(index, info)

    def _commit(self, index: int, info: dict) -> dict:
        info["bytes"] = sum(size for size, _ in info["files"].values())
        info["acts_bytes"] = sum(size for rel, (size, _) in info["files"].items() if rel.startswith("acts/"))
        info["committed_at"] = time.time()
        check_held(self.layout.root)  # object stores: never commit after losing the run's lease
        path = self.layout.commit_path(index)
        if not getattr(self.files, "conditional", False):
            # the commit point (a local rename; elsewhere one PUT, `write` having checked it is not there)
            write_json_atomic(path, info, fsync=self.fsync, failpoint="commit")
            return info
        # S3: the commit point is a PUT with If-None-Match: *, so a commit that lands late (a writer
        # frozen past its lease) never replaces a commit record written since
        failpoints.hit("commit.before_rename")
        try:
            self.files.put_if_absent(path, json_bytes(info))
        except PreconditionFailed:
            raise StoreError(_already_committed(index)) from None
        failpoints.hit("commit.renamed")
        return info

    def _write_remote(self, index: int, records: list[SequenceRecord]) -> dict:
        """Object store: build in a local staging folder, upload every file under its final name, then
        the commit record (one PUT, last). Objects without a commit record are invisible to readers."""
        final = self.layout.shard_path(index)
        with staging_dir() as staging:  # flocked while in use: no other process's cleanup removes it
            local = staging / final.name
            info = self._build(local, index, records)
            info["files"] = manifest(local)
            failpoints.hit("shard.built")
            check_held(self.layout.root)
            # an uncommitted leftover of a crash (this process owns the index): never visible, safe to drop,
            # and its stray objects would be files the commit record does not list
            self.files.remove(final)
            self.files.upload(local, final, list(info["files"]))
            failpoints.hit("shard.renamed")
        return self._commit(index, info)

    def _write_acts(self, acts: zarr.Group, path: Path, hook: str, width: int, records, n: int, pool) -> int:
        """One hook's [n, width] array: zarr writes its metadata, shardfile its one storage object.
        -> raw bytes (storage dtype, before compression)."""
        data = np.concatenate([r.acts[hook] for r in records]).astype(self.np_dtype, copy=False)  # [n, width]
        rows = min(chunk_rows(width, self.np_dtype.itemsize, self.chunk_bytes), max(n, 1))
        shard_rows = -(-max(n, 1) // rows) * rows  # one shard object holds the whole array
        acts.create_array(
            hook,
            shape=data.shape,
            dtype=self.np_dtype,
            chunks=(rows, width),
            shards=(shard_rows, width),
            compressors=_compressors(self.codec_name, self.codec_level, self.np_dtype.itemsize),
            config=_ARRAY_CONFIG,
            # [n, width]; named after the width's kind, so hooks of one kind share a dimension in xarray
            dimension_names=("token", "d_mlp" if hook.endswith("mlp.hook_post") else "d_model"),
            attributes={"hook": hook, "logical_dtype": self.storage_dtype},
        )
        codec = compressor(self.codec_name, self.codec_level, self.np_dtype.itemsize, BLOSC_BLOCKSIZE)
        write_shard_object(path / "acts" / hook / "c" / "0" / "0", data, rows, codec, pool)
        return data.nbytes

    def _build(self, path: Path, index: int, records: list[SequenceRecord]) -> dict:
        counts = np.array([r.num_tokens for r in records], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        n = int(counts.sum())
        sids = [int(r.meta["sequence_id"]) for r in records]
        if len(set(sids)) != len(sids):
            raise StoreError("duplicate sequence ids within one shard")

        tokens = {
            k: np.concatenate([np.asarray(r.tokens[k]) for r in records]).astype(dt, copy=False)
            for k, dt in TOKEN_COLUMNS.items()
        }  # each [n]
        tokens["sequence"] = np.repeat(np.asarray(sids, dtype=DERIVED_TOKEN_COLUMNS["sequence"]), counts)
        tokens["first_token"] = tokens["position"] == 0  # attention-sink rows: mask, never drop
        table = build_sequence_table([r.meta for r in records])
        table["token_offset"], table["token_count"] = offsets, counts

        hooks_attr = {
            h: {"width": w, "storage_dtype": str(self.np_dtype), "logical_dtype": self.storage_dtype}
            for h, w in self.hooks.items()
        }
        phase_counts = {p: int((tokens["phase"] == code).sum()) for p, code in PHASES.items()}
        attrs = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "shard": index,
            "num_tokens": n,
            "num_sequences": len(records),
            "hooks": hooks_attr,
            "codec": self.codec,
            "tokens_per_phase": phase_counts,
        }
        root = zarr.open_group(str(path), mode="w", zarr_format=3, attributes=attrs)
        seq = root.create_group("sequences")
        columns = [(root, name, col, "token") for name, col in tokens.items()]
        columns += [(seq, name, col, "sequence") for name, col in table.items()]
        # each small array costs a few ms of zarr round trips, mostly waiting: write them concurrently
        with ThreadPoolExecutor(_COLUMN_THREADS) as columns_pool:
            list(columns_pool.map(lambda c: _write_column(*c), columns))
        acts = root.create_group("acts")
        raw = 0
        pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        try:
            for hook, width in self.hooks.items():
                raw += self._write_acts(acts, path, hook, width, records, n, pool)
                failpoints.hit("shard.building")  # a crash (or a full disk) halfway through a shard
        finally:
            if pool is not None:
                pool.shutdown()
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "shard": index,
            "path": self.layout.shard_path(index).relative_to(self.layout.root).as_posix(),
            "num_tokens": n,
            "num_sequences": len(records),
            "sequence_ids": sids,
            "tokens_per_phase": phase_counts,
            "hooks": {h: w for h, w in self.hooks.items()},
            "storage_dtype": self.storage_dtype,
            "codec": self.codec,
            "acts_raw_bytes": raw,
        }
