"""Read API over a harvest run folder: only committed shards are visible.

    s = open_store("outputs/demo")
    s.hooks, s.num_tokens, s.num_sequences, s.metadata
    s.sequences                  # SequenceTable: dict of numpy columns (+ .to_pandas())
    s.sequence(sequence_id)      # per-token columns + one [T, d] array per hook, shared prompt rows included
    s.activations(hook)[a:b]     # lazy [N, d] view over all committed tokens, logical dtype
    s.tokens("phase")            # [N] per-token column across all shards (a copy)
    s.hook_dtype(hook)           # logical numpy dtype of a hook (bfloat16 included)
    s.batches(hook, 4096)        # shuffled training batches (harvest.store.loader, docs/TRAINING.md)
    s.stats(hook)                # cached per-hook statistics (harvest.store.stats)

Global token order is shard index order, then row order inside each shard. `chunk_index(hook)`
lists (shard, start, stop) row ranges aligned to the inner Zarr chunks: the unit a shuffled
loader reads.

The modules built on the reader (chunks, stats, loader) use only its public methods: `array`,
`token_column`, `hook_dtype`, `check_hook`, `shard_starts`, `read_rows`, `chunk_index` and `memo`.
This module imports none of them, so imports flow one way (reader -> chunks -> stats -> loader -> api).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import zarr

from harvest.store.format import FORMAT_VERSION, StoreLayout
from harvest.store.integrity import check_files, is_metadata
from harvest.store.location import URL
from harvest.store.runfolder import NotARunError, StoreError, check_run_folder, read_commits, read_run_metadata
from harvest.store.sequences import (
    RowRange,
    SequenceTable,
    StoredRows,
    check_prompt_positions,
    join,
    join_tables,
    plan_rows,
    stored_rows,
)
from harvest.store.shard import from_storage

__all__ = ["StoreReader", "ActivationView", "SequenceTable", "ChunkRef", "ShardInfo", "NotARunError"]

T = TypeVar("T")
_REMOTE_READS = 16  # concurrent requests when reading many small arrays from an object store


@dataclasses.dataclass(frozen=True)
class ChunkRef:
    """Rows [start, stop) of shard `shard` (its position in Store.shards); global row = offset + start."""

    shard: int
    start: int
    stop: int
    offset: int  # global row index of the shard's first row


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    index: int  # the shard's number in its file name
    path: Path | URL  # a local folder, or an object-store prefix
    num_tokens: int
    offset: int  # global row of its first token
    sequence_ids: tuple[int, ...]
    files: dict | None  # relative path -> [size, crc32c] (format version 2); None for version 1


def _plain(col: np.ndarray) -> np.ndarray:
    # zarr 3.1 returns numpy StringDType for strings; object arrays are friendlier to pandas and users
    return col.astype(object) if col.dtype.kind in "TU" else col


class StoreReader:
    """Committed shards of one run folder, read lazily. `harvest.store.api.Store` adds training reads."""

    def __init__(self, root: str | os.PathLike):
        self.layout = StoreLayout(root)
        self.root = self.layout.root
        self.files = self.layout.files
        check_run_folder(self.layout)
        commits = read_commits(self.root)
        self.shards: list[ShardInfo] = []
        offset = 0
        hooks = None
        for i, rec in commits.items():
            if rec.get("format_version", 0) > FORMAT_VERSION:
                raise StoreError(
                    f"shard {i} has format version {rec['format_version']}; this harvest reads <= {FORMAT_VERSION}"
                )
            if hooks is None:
                hooks = rec["hooks"]
            elif rec["hooks"] != hooks:
                raise StoreError(f"shard {i} has hooks {sorted(rec['hooks'])}, shard 0 has {sorted(hooks)}")
            self.shards.append(
                ShardInfo(
                    i, self.root / rec["path"], rec["num_tokens"], offset, tuple(rec["sequence_ids"]), rec.get("files")
                )
            )
            offset += rec["num_tokens"]
        self.commits = list(commits.values())
        self.hook_widths: dict[str, int] = dict(hooks or {})
        self.num_tokens = offset
        self._shard_of_sequence = {sid: k for k, sh in enumerate(self.shards) for sid in sh.sequence_ids}
        self.num_sequences = sum(len(sh.sequence_ids) for sh in self.shards)
        if len(self._shard_of_sequence) != self.num_sequences:
            raise StoreError("a sequence id is committed in more than one shard")
        # [S] global row of each shard's first row: searchsorted(shard_starts, row, "right") - 1 is its shard
        self.shard_starts = np.array([sh.offset for sh in self.shards], dtype=np.int64)
        self.shard_starts.flags.writeable = False
        self._groups: dict[int, zarr.Group] = {}
        self._arrays: dict[tuple[int, str], zarr.Array] = {}
        self._token_cache: dict[str, np.ndarray] = {}
        self._table_cache: list[dict[str, np.ndarray]] | None = None
        self._table_rows: dict[int, dict[int, int]] = {}  # shard position -> sequence id -> its table row
        self._hook_dtypes: dict[str, np.dtype] = {}
        self._memo: dict[Hashable, Any] = {}

    # ------------------------------------------------------------ summary

    @property
    def hooks(self) -> list[str]:
        return list(self.hook_widths)

    @functools.cached_property
    def metadata(self) -> dict:
        try:
            return read_run_metadata(self.root)
        except FileNotFoundError:
            return {}

    @property
    def storage_dtype(self) -> str | None:
        return self.commits[0]["storage_dtype"] if self.commits else None

    @property
    def codec(self) -> dict | None:
        return self.commits[0]["codec"] if self.commits else None

    def __repr__(self) -> str:
        return (
            f"Store({str(self.root)!r}, shards={len(self.shards)}, sequences={self.num_sequences}, "
            f"tokens={self.num_tokens}, hooks={self.hooks}, dtype={self.storage_dtype})"
        )

    def check_hook(self, hook: str) -> None:
        """KeyError unless `hook` is one of the store's hooks (the one message every reader gives)."""
        if hook not in self.hook_widths:
            raise KeyError(f"hook {hook!r} not in store; hooks: {', '.join(self.hooks)}")

    def hook_dtype(self, hook: str) -> np.dtype:
        """The logical numpy dtype of a hook's activations (ml_dtypes.bfloat16 for bfloat16 stores);
        read from shard 0's array metadata, no data."""
        if hook not in self._hook_dtypes:
            self.check_hook(hook)
            arr = self.array(0, f"acts/{hook}")
            self._hook_dtypes[hook] = from_storage(
                np.empty(0, np.dtype(arr.dtype)), arr.attrs.get("logical_dtype")
            ).dtype
        return self._hook_dtypes[hook]

    def memo(self, key: Hashable, compute: Callable[[], T], refresh: bool = False) -> T:
        """compute(), once per open store and key (refresh=True computes again and replaces it).

        The in-memory cache of the modules built on the reader (harvest.store.stats keys it by
        ("stats", hook, top_k, outlier_factor)): a store is a snapshot of its committed shards, so a
        value stays valid while the store is open. Not locked: two threads may both compute; one wins.
        """
        if refresh or key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    # ------------------------------------------------------------ zarr access (cached per shard)

    def group(self, k: int) -> zarr.Group:
        """The Zarr group of the k-th committed shard (k is a position in self.shards).

        Opening a version-2 shard checks it against its commit record first: every file present at
        its size, and the crc32c of its zarr.json files (chunks carry their own checksums)."""
        if k not in self._groups:
            sh = self.shards[k]
            # version 2: the manifest check lists the folder anyway (one LIST on an object store)
            meta: dict[str, bytes] = {}  # object stores: the zarr.json bytes just checksummed
            problems = check_files(sh.path, sh.files, checksum=is_metadata, fetched=meta) if sh.files else []
            gone = len(problems) == len(sh.files or ()) and all(p.what == "missing" for p in problems)
            if gone and not self.files.is_dir(sh.path):
                raise self.damaged(k, "", "the shard folder is missing")
            if problems:
                raise self.damaged(k, problems[0].path, problems[0].detail)
            with self.reading(k, "zarr.json"):
                self._groups[k] = zarr.open_group(self.files.zarr_store(sh.path, prefetched=meta), mode="r")
        return self._groups[k]

    def array(self, k: int, name: str) -> zarr.Array:
        """The Zarr array `name` (a per-token column, or "acts/<hook>") of the k-th committed shard."""
        if (k, name) not in self._arrays:
            group = self.group(k)
            with self.reading(k, f"{name}/zarr.json"):
                self._arrays[(k, name)] = group[name]
        return self._arrays[(k, name)]

    def damaged(self, k: int, file: str, detail: str) -> StoreError:
        """The one error for unreadable data: it names the run, the shard and the file (relative to the
        shard folder) and points at `harvest verify`."""
        sh = self.shards[k]
        return StoreError(
            f"{self.root}: shard {sh.index} is damaged: {f'{sh.path.name}/{file}' if file else sh.path.name}: "
            f"{detail}; run `harvest verify {self.root}` (--repair sets it aside for the next harvest to redo)"
        )

    @contextlib.contextmanager
    def reading(self, k: int, file: str):
        """Turn any failure to read or decode shard k's `file` into `damaged(...)`."""
        try:
            yield
        except StoreError:
            raise
        except Exception as e:
            detail = (str(e).strip().splitlines() or [""])[0]
            if "checksum" in detail.lower():  # zarr's crc32c codec: say which check failed, not the bytes
                detail = "a chunk fails its crc32c checksum"
            raise self.damaged(k, file, f"{type(e).__name__}: {detail}") from e

    def _shard_table(self, k: int) -> dict[str, np.ndarray]:
        return self._tables()[k]

    def _tables(self) -> list[dict[str, np.ndarray]]:
        if self._table_cache is None:

            def arrays(k: int) -> list:
                with self.reading(k, "sequences/zarr.json"):
                    return list(self.group(k)["sequences"].arrays())

            def read(item: tuple) -> np.ndarray:
                k, name, arr = item
                with self.reading(k, data_file(f"sequences/{name}")):
                    return _plain(arr[...])

            listed = self.map_reads(arrays, range(len(self.shards)))
            items = [(k, name, arr) for k, found in enumerate(listed) for name, arr in found]
            tables: list[dict[str, np.ndarray]] = [{} for _ in self.shards]
            for (k, name, _), col in zip(items, self.map_reads(read, items)):
                tables[k][name] = col
            self._table_cache = tables
        return self._table_cache

    def map_reads(self, fn: Callable[[Any], T], items) -> list[T]:
        """[fn(x) for x in items], concurrently on an object store, where each read is a round trip;
        in order on a local disk. The first failure (in item order) is raised either way."""
        if not self.files.remote:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(_REMOTE_READS) as pool:
            return list(pool.map(fn, items))

    # ------------------------------------------------------------ public reads

    @functools.cached_property
    def sequences(self) -> SequenceTable:
        """All shards' tables concatenated; columns missing in some shard are filled (-1, nan, '', False).

        token_offset is made global (a row index into activations()/tokens()).
        """
        return join_tables(self._tables(), [len(sh.sequence_ids) for sh in self.shards], self.shard_starts)

    def tokens(self, name: str) -> np.ndarray:
        """[N] per-token column (token_id, position, sequence, phase, segment, example, row, col,
        first_token) across all committed shards: a copy the caller may modify."""
        return self.token_column(name).copy()

    def token_column(self, name: str) -> np.ndarray:
        """[N] the same column as tokens(name), read once per open store and shared: read-only."""
        if name not in self._token_cache:
            if not self.shards:
                raise StoreError("the store has no committed shards")

            def read(k: int) -> np.ndarray:
                arr = self.array(k, name)
                with self.reading(k, data_file(name)):
                    return arr[...]

            col = np.concatenate(self.map_reads(read, range(len(self.shards))))
            col.flags.writeable = False  # every caller gets this one array
            self._token_cache[name] = col
        return self._token_cache[name]

    def activations(self, hook: str, dtype: Any = None) -> ActivationView:
        self.check_hook(hook)
        return ActivationView(self, hook, dtype)

    def sequence(self, sequence_id: int) -> dict[str, np.ndarray]:
        """Per-token columns and one [T, d] array per hook for one whole sequence, in position order.
        Shared prompt rows (format version 3) come from the donor sequences (harvest.store.sequences);
        `sequence` is then this sequence's id on every row."""
        sid = int(sequence_id)
        if sid not in self._shard_of_sequence:
            raise KeyError(f"sequence {sequence_id} is not committed in {self.root}")
        ranges = plan_rows(sid, self._stored_rows, self.root)  # borrowed prompt rows first, then its own

        def column(name: str, r: RowRange) -> np.ndarray:
            arr = self.array(r.shard, name)
            with self.reading(r.shard, data_file(name)):
                return arr[r.start : r.stop]

        out = {name: join([column(name, r) for r in ranges]) for name, _ in self.group(ranges[-1].shard).arrays()}
        for hook in self.hooks:
            out[hook] = join([self.read_rows(hook, r.shard, r.start, r.stop) for r in ranges])  # [T, d]
        if len(ranges) > 1:
            out["sequence"][:] = sid  # the borrowed rows belong to this sequence too
            check_prompt_positions(self.root, sid, out["position"], self._stored_rows(sid).prompt_length)
        return out

    def _stored_rows(self, sid: int) -> StoredRows | None:
        """Where sequence sid's rows sit and what prompt prefix it shares; None if it is not committed."""
        k = self._shard_of_sequence.get(sid)
        if k is None:
            return None
        table = self._shard_table(k)
        if k not in self._table_rows:
            self._table_rows[k] = {int(s): j for j, s in enumerate(table["sequence_id"])}
        return stored_rows(table, k, self._table_rows[k][sid])

    def chunk_index(self, hook: str | None = None) -> list[ChunkRef]:
        """Row ranges aligned to the inner chunks of `hook` (default: the first hook)."""
        hook = hook or self.hooks[0]
        self.check_hook(hook)
        out = []
        for k, sh in enumerate(self.shards):
            rows = self.array(k, f"acts/{hook}").chunks[0]
            for a in range(0, sh.num_tokens, rows):
                out.append(ChunkRef(k, a, min(a + rows, sh.num_tokens), sh.offset))
        return out

    def read_rows(self, hook: str, k: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of shard k for hook, in logical dtype. [stop-start, d]"""
        name = f"acts/{hook}"
        arr = self.array(k, name)
        with self.reading(k, data_file(name)):
            return from_storage(arr[start:stop], arr.attrs.get("logical_dtype"))


def data_file(name: str) -> str:
    """The file holding array `name`'s data, relative to its shard: activations are one sharding
    object (c/0/0); the token and sequence columns are one chunk (c/0)."""
    return f"{name}/c/0/0" if name.startswith("acts/") else f"{name}/c/0"


class ActivationView:
    """Lazy [N, d] view of one hook over all committed tokens. Indexing reads only what it needs.

    Supports v[i], v[a:b:s], v[int array], v[bool mask], and a second index on d (v[rows, cols]).
    """

    def __init__(self, store: StoreReader, hook: str, dtype: Any = None):
        self.store, self.hook = store, hook
        self.width = store.hook_widths[hook]
        self.shape = (store.num_tokens, self.width)
        self._cast = None if dtype is None else np.dtype(dtype)

    @property
    def dtype(self) -> np.dtype:
        return self._cast if self._cast is not None else self.store.hook_dtype(self.hook)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        x = self[:]
        return x if dtype is None else x.astype(dtype)

    def __repr__(self) -> str:
        return f"ActivationView({self.hook!r}, shape={self.shape}, dtype={self.dtype})"

    def __getitem__(self, key) -> np.ndarray:
        cols = slice(None)
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError("at most 2 indices: rows, dims")
            key, cols = key
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"row {key} out of range for {self.shape[0]} rows")
            return self._read_sorted(np.array([i]))[0][cols]
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step == 1:
                return self._read_range(start, stop)[:, cols]
            key = np.arange(start, stop, step)
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (self.shape[0],):
                raise IndexError(f"boolean mask has shape {idx.shape}, want ({self.shape[0]},)")
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise IndexError("row index must be an int, slice, 1-D int array or bool mask")
        idx = np.where(idx < 0, idx + self.shape[0], idx)
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
            raise IndexError(f"row index out of range for {self.shape[0]} rows")
        order = np.argsort(idx, kind="stable")
        out = self._read_sorted(idx[order])
        res = np.empty_like(out)
        res[order] = out  # back to the caller's order
        return res[:, cols]

    def _finish(self, x: np.ndarray) -> np.ndarray:
        return x if self._cast is None else x.astype(self._cast)

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        parts = []
        k = max(int(np.searchsorted(self.store.shard_starts, start, side="right")) - 1, 0)
        while start < stop and k < len(self.store.shards):
            sh = self.store.shards[k]
            a, b = start - sh.offset, min(stop, sh.offset + sh.num_tokens) - sh.offset
            if b > a:
                parts.append(self.store.read_rows(self.hook, k, a, b))
                start = sh.offset + b
            k += 1
        if not parts:
            return self._finish(self._empty())
        return self._finish(np.concatenate(parts) if len(parts) > 1 else parts[0])

    def _read_sorted(self, idx: np.ndarray) -> np.ndarray:
        # idx: sorted global rows; group by shard, read each shard's rows with one orthogonal read
        parts = []
        shard_of = np.searchsorted(self.store.shard_starts, idx, side="right") - 1  # [n]
        for k in np.unique(shard_of):
            local = idx[shard_of == k] - self.store.shards[k].offset
            name = f"acts/{self.hook}"
            arr = self.store.array(int(k), name)
            with self.store.reading(int(k), data_file(name)):
                rows = arr.get_orthogonal_selection((local, slice(None)))
            parts.append(from_storage(rows, arr.attrs.get("logical_dtype")))
        if not parts:
            return self._finish(self._empty())
        return self._finish(np.concatenate(parts) if len(parts) > 1 else parts[0])

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.width), dtype=self.dtype)
