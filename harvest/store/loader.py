"""Shuffled activation batches for SAE / transcoder training, straight from a harvest store.

    for x in store.batches("blocks.6.hook_resid_post", 4096, seed=0, epochs=2):   # x: [4096, d]
        ...
    for xs in store.batches(["blocks.6.hook_resid_mid", "blocks.6.hook_mlp_out"], 4096):
        ...                                                       # {hook: [4096, d_hook]}, same token rows

Pipeline, per epoch (docs/TRAINING.md has the user-facing contract):
  1. select   a [N] bool mask of the rows to train on (phase, segment, first-token, outlier filters);
  2. plan     read units (whole inner Zarr chunks, the same rows for every hook) in a seeded
              permutation; the selected rows of that order are cut into process_count contiguous,
              exact pieces (a unit on a cut is read by both neighbours, each taking its part);
  3. read     buffer_chunks units at a time, decoded by a thread pool straight from the shard files
              into a reused buffer (whole chunks; zarr only where the layout is not the documented one);
  4. mix      permute the buffer's selected rows with the < batch_size rows carried from the last one;
  5. emit     gather each batch (one copy), cast / normalise, and hand it over through a bounded queue
              filled by one background thread, which reads the next buffer meanwhile.

Impossible options are refused when the loader is built, before any read (FieldError, naming the
option); so are a store with no committed shards, filters that select no row, and a process share
with no batch (LoaderError): a loader never yields nothing silently.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from harvest.errors import FieldError
from harvest.store.chunks import ChunkReader
from harvest.store.format import PHASES, SEGMENTS
from harvest.store.reader import ChunkRef, StoreReader
from harvest.store.runfolder import StoreError
from harvest.store.stats import hook_stats

__all__ = ["LoaderConfig", "LoaderError", "Batches", "batches", "select_rows", "read_units", "epoch_plan"]

EXCLUDES = ("first_token", "outliers")
NORMALIZE = (None, "scale", "center")


class LoaderError(StoreError, ValueError):
    """The store and the options leave nothing to train on: no committed shards, no selected row,
    or no batch for this process. (An impossible option on its own is a FieldError.)"""


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    hooks: tuple[str, ...]
    batch_size: int
    shuffle: bool = True
    seed: int = 0
    epochs: int | None = 1  # None: repeat forever (a fresh permutation each epoch)
    phase: str | None = None  # "prefill" | "decode" | None (both)
    segment: tuple[str, ...] | None = None  # ARC segment names (docs/ARC.md), None: all
    exclude: tuple[str, ...] = ("first_token",)  # "first_token", "outliers"
    outlier_factor: float = 10.0  # "outliers": norm > outlier_factor x median norm (any hook)
    process_index: int = 0
    process_count: int = 1
    dtype: Any = None  # None: the stored dtype (bfloat16 stays bfloat16)
    normalize: str | None = None  # None | "scale" (x * sqrt(d)/E|x|) | "center" ((x - mean) * sqrt(d/sum var))
    drop_last: bool = False
    buffer_chunks: int = 16  # units mixed together; rows of one batch come from this many chunks
    prefetch: int = 8  # batches waiting in the queue
    workers: int = 2  # chunk-read threads (zarr and blosc release the GIL while decoding)
    with_rows: bool = False  # yield (global row ids [B], batch) instead of batch

    def __post_init__(self):
        """Refuse impossible options (FieldError: one line, the option, its value, the rule).
        The checks that need the store (hook names, segment names) are in Batches."""
        if not self.hooks:
            raise FieldError("hooks", "none given; pass a hook name or a list of hook names")
        repeated = sorted({h for h in self.hooks if self.hooks.count(h) > 1})
        if repeated:
            raise FieldError("hooks", f"{', '.join(map(repr, repeated))} repeated; give each hook once")
        for name in ("batch_size", "buffer_chunks", "prefetch", "workers", "process_count"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"{getattr(self, name)} is impossible; it must be >= 1")
        if self.epochs is not None and self.epochs < 1:
            raise FieldError("epochs", f"{self.epochs} is impossible; it must be >= 1, or None to repeat forever")
        if not 0 <= self.process_index < self.process_count:
            raise FieldError(
                "process_index",
                f"{self.process_index} is impossible; it must be in [0, process_count={self.process_count})",
            )
        if not self.outlier_factor > 1:  # NaN too
            raise FieldError(
                "outlier_factor",
                f"{self.outlier_factor:g} is impossible; it must be > 1 (a multiple of the median norm)",
            )
        if self.phase is not None and self.phase not in PHASES:
            raise FieldError("phase", f"{self.phase!r} is not one of {', '.join(PHASES)}, None")
        bad = [x for x in self.exclude if x not in EXCLUDES]
        if bad:
            raise FieldError("exclude", f"{bad[0]!r} is not one of {', '.join(EXCLUDES)}")
        if self.normalize not in NORMALIZE:
            raise FieldError("normalize", f"{self.normalize!r} is not one of scale, center, None")


# ---------------------------------------------------------------- 1. select


def segment_codes(store: StoreReader, names: Iterable[str]) -> list[int]:
    """ARC segment names -> codes, from the run's provenance (run.json) or harvest.arc."""
    table = store.metadata.get("segments")
    if not table:
        table = SEGMENTS
    unknown = [n for n in names if n not in table]
    if unknown:
        raise FieldError("segment", f"{unknown[0]!r} is not one of this run's segments: {', '.join(table)}")
    return [int(table[n]) for n in names]


def select_rows(store: StoreReader, cfg: LoaderConfig) -> np.ndarray:
    """[N] bool: True for the rows this configuration trains on (before the process split)."""
    codes = None if cfg.segment is None else segment_codes(store, cfg.segment)  # unknown names: before any read
    keep = np.ones(store.num_tokens, dtype=bool)  # [N]
    if cfg.phase is not None:
        keep &= store.token_column("phase") == PHASES[cfg.phase]
    if codes is not None:
        keep &= np.isin(store.token_column("segment"), codes)
    if "first_token" in cfg.exclude:
        keep &= ~store.token_column("first_token")
    if "outliers" in cfg.exclude:
        for hook in cfg.hooks:  # memoised on the store: shared with store.stats() and normalisation
            keep &= ~hook_stats(store, hook).outlier_mask(cfg.outlier_factor)
    return keep


# ---------------------------------------------------------------- 2. plan


def read_units(store: StoreReader, hooks: Iterable[str]) -> list[ChunkRef]:
    """Row ranges read as one unit, the same for every hook: per shard, the chunk grid of the hook
    with the largest chunks (rows are powers of two or the whole shard, so the others nest in it)."""
    by_hook = [store.chunk_index(h) for h in hooks]
    units = []
    for k in range(len(store.shards)):
        per_hook = [[c for c in idx if c.shard == k] for idx in by_hook]
        units += min(per_hook, key=len)
    return units


def epoch_plan(counts: np.ndarray, cfg: LoaderConfig, epoch: int) -> list[tuple[int, int, int]]:
    """-> [(unit, a, b)]: take selected rows [a, b) of each unit, in read order, for this process.

    counts: [U] selected rows per unit. Every process draws the same permutation (seed, epoch)
    and takes its contiguous share of the selected rows: exact, disjoint, sizes differ by <= 1
    (with drop_last all shares have floor(S / process_count) rows, so step counts match).
    """
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(counts)) if cfg.shuffle else np.arange(len(counts))
    cum = np.concatenate([[0], np.cumsum(counts[order])])  # [U+1] selected rows before each unit
    total, p, P = int(cum[-1]), cfg.process_index, cfg.process_count
    lo = total * p // P
    hi = lo + total // P if cfg.drop_last else total * (p + 1) // P
    plan = []
    for j in range(np.searchsorted(cum, lo, side="right") - 1, len(order)):
        a, b = max(lo, cum[j]), min(hi, cum[j + 1])
        if cum[j] >= hi:
            break
        if b > a:
            plan.append((int(order[j]), int(a - cum[j]), int(b - cum[j])))
    return plan


# ---------------------------------------------------------------- 4. mix, 5. emit


def _read_group(pool, reader: ChunkReader, keep, units, group, hooks, spare: int, slab: dict) -> list:
    """Start decoding a group's units into the slab (one reused buffer per hook) -> [bufs, idx, rows, futures].

    The first `spare` rows are left free for the rows carried over from the last group, so that
    the gather mixes both. idx: [M] buffer rows selected; rows: [M] their global row ids.
    """
    refs = [units[u] for u, _, _ in group]
    base = spare + np.cumsum([0] + [r.stop - r.start for r in refs])  # [G+1] buffer row of each unit
    bufs = {h: slab[h][: base[-1]] for h in hooks}
    futures = [
        pool.submit(reader.read_into, h, r, bufs[h][base[i] : base[i + 1]]) for i, r in enumerate(refs) for h in hooks
    ]
    sels = [np.flatnonzero(keep[r.offset + r.start : r.offset + r.stop])[a:b] for r, (_, a, b) in zip(refs, group)]
    idx = np.concatenate([base[i] + s for i, s in enumerate(sels)])
    rows = np.concatenate([r.offset + r.start + s for r, s in zip(refs, sels)])
    return [bufs, idx, rows, futures]


def _mix_emit(put, cfg: LoaderConfig, transform, pending, carry, rng, spare: int):
    """Shuffle the carried rows with the group's selected rows and emit full batches, each one
    gathered from the buffer (one copy, into fresh small arrays the consumer may keep).

    carry: (rows [r], {hook: [r, d]}), r <= spare. -> the new carry (the rows short of a batch).
    """
    bufs, idx, rows, futures = pending
    for f in futures:
        f.result()
    r, B = len(carry[0]), cfg.batch_size
    idx = np.concatenate([np.arange(spare - r, spare), idx])
    rows = np.concatenate([carry[0], rows])
    if cfg.shuffle:
        perm = rng.permutation(len(idx))
        idx, rows = idx[perm], rows[perm]
    for h in cfg.hooks:
        bufs[h][spare - r : spare] = carry[1][h]
    n_full = len(idx) // B * B
    for i in range(0, n_full, B):
        put((rows[i : i + B], {h: transform(h, np.take(bufs[h], idx[i : i + B], axis=0)) for h in cfg.hooks}))
    return rows[n_full:], {h: np.take(bufs[h], idx[n_full:], axis=0) for h in cfg.hooks}


class _Transform:
    """Storage bits -> the requested dtype, optionally normalised with the store's statistics."""

    def __init__(self, store: StoreReader, cfg: LoaderConfig):
        self.logical = {h: store.hook_dtype(h) for h in cfg.hooks}
        self.dtype = None if cfg.dtype is None else np.dtype(cfg.dtype)
        self.shift, self.scale = {}, {}
        if cfg.normalize is not None:
            self.dtype = self.dtype or np.dtype(np.float32)
            group = cfg.phase or "all"
            for h in cfg.hooks:
                g = hook_stats(store, h).group(group)
                if cfg.normalize == "center":
                    self.shift[h] = g.mean.astype(np.float32)  # [d]
                    self.scale[h] = np.float32(np.sqrt(len(g.var) / g.var.sum()))
                else:
                    self.scale[h] = np.float32(g.scale_factor)

    def __call__(self, h: str, bits: np.ndarray) -> np.ndarray:
        x = bits.view(self.logical[h]) if bits.dtype != self.logical[h] else bits
        if h in self.scale:
            x = x.astype(np.float32)
            if h in self.shift:
                x -= self.shift[h]
            x *= self.scale[h]
        return x if self.dtype is None else x.astype(self.dtype, copy=False)


def _produce(store: StoreReader, cfg: LoaderConfig, keep, units, counts, reader, transform, put) -> None:
    """The background thread: the whole pipeline; `put(item)` blocks on the bounded queue."""
    empty = (np.zeros(0, np.int64), {h: np.zeros((0, store.hook_widths[h]), reader.dtype(h)) for h in cfg.hooks})
    spare = cfg.batch_size - 1  # room for the carried rows in every group buffer
    most = spare + cfg.buffer_chunks * max((u.stop - u.start for u in units), default=0)
    # two slabs, reused: one being decoded (read-ahead) while the other is gathered from; fresh
    # 50+ MB arrays every group would cost a page fault per 4 KiB
    slabs = [{h: np.empty((most, store.hook_widths[h]), reader.dtype(h)) for h in cfg.hooks} for _ in range(2)]
    epochs = range(cfg.epochs) if cfg.epochs is not None else itertools.count()
    pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="harvest-read")
    try:
        for epoch in epochs:
            plan = epoch_plan(counts, cfg, epoch)
            rng = np.random.default_rng([cfg.seed, epoch, cfg.process_index, 1])
            groups = [plan[i : i + cfg.buffer_chunks] for i in range(0, len(plan), cfg.buffer_chunks)]
            pending = _read_group(pool, reader, keep, units, groups[0], cfg.hooks, spare, slabs[0]) if groups else None
            carry = empty  # (rows [r], {hook: [r, d]}), r < batch_size, already shuffled
            for gi in range(len(groups)):
                current = pending
                if gi + 1 < len(groups):  # read ahead while this group is mixed and emitted
                    pending = _read_group(
                        pool, reader, keep, units, groups[gi + 1], cfg.hooks, spare, slabs[(gi + 1) % 2]
                    )
                carry = _mix_emit(put, cfg, transform, current, carry, rng, spare)
            if len(carry[0]) and not cfg.drop_last:
                put((carry[0], {h: transform(h, x) for h, x in carry[1].items()}))
    finally:  # a consumer that stops early should not wait for the read-ahead
        pool.shutdown(wait=True, cancel_futures=True)


_DONE = object()


class Batches:
    """An iterable over the batches of a configuration; each iter() is a full, fresh pass.

    len() is the number of batches this process yields over all epochs (TypeError if endless).
    """

    def __init__(self, store: StoreReader, cfg: LoaderConfig, single: bool):
        self.store, self.cfg, self.single = store, cfg, single
        # refused here rather than on first iteration: all of it is cheap (token columns, counts)
        if not store.shards:
            raise LoaderError(f"{store.root} has no committed shards; there is nothing to train on yet")
        for h in cfg.hooks:
            try:
                store.check_hook(h)
            except KeyError as e:
                raise FieldError("hooks", e.args[0]) from None
        self.keep = select_rows(store, cfg)  # [N] bool
        self.num_selected = int(self.keep.sum())
        if not self.num_selected:
            raise LoaderError(
                f"no rows match phase={cfg.phase!r}, segment={cfg.segment!r}, exclude={cfg.exclude!r} in "
                f"{store.root} ({store.num_tokens:,} rows before filtering); loosen the filters"
            )
        if not self.batches_per_epoch():
            raise LoaderError(self._no_batch())
        self.units = read_units(store, cfg.hooks)
        starts = np.array([u.offset + u.start for u in self.units], dtype=np.int64)
        self.counts = np.add.reduceat(self.keep.astype(np.int64), starts) if len(starts) else starts  # [U]
        # built here, in the caller's thread: statistics may be computed, errors surface early
        self.reader = ChunkReader(store, cfg.hooks)
        self.transform = _Transform(store, cfg)

    def _no_batch(self) -> str:
        c, n, S = self.cfg, self.rows_per_epoch, self.num_selected
        who = f"process_index={c.process_index} of process_count={c.process_count}"
        if c.drop_last:
            return (
                f"{who} gets {n:,} of the {S:,} selected rows per epoch, fewer than batch_size={c.batch_size}, "
                "so drop_last=True leaves it no batch; lower batch_size or process_count"
            )
        return f"{who} gets none of the {S:,} selected rows per epoch; lower process_count or loosen the filters"

    @property
    def rows_per_epoch(self) -> int:
        """Rows this process yields per epoch."""
        S, p, P = self.num_selected, self.cfg.process_index, self.cfg.process_count
        return S // P if self.cfg.drop_last else S * (p + 1) // P - S * p // P

    def batches_per_epoch(self) -> int:
        n, b = self.rows_per_epoch, self.cfg.batch_size
        return n // b if self.cfg.drop_last else -(-n // b)

    def __len__(self) -> int:
        if self.cfg.epochs is None:
            raise TypeError("endless loader (epochs=None) has no length")
        return self.batches_per_epoch() * self.cfg.epochs

    def __iter__(self) -> Iterator:
        q: queue.Queue = queue.Queue(maxsize=self.cfg.prefetch)
        stop = threading.Event()

        def put(item):
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue
            raise _Stopped

        def work():
            try:
                _produce(self.store, self.cfg, self.keep, self.units, self.counts, self.reader, self.transform, put)
                put(_DONE)
            except _Stopped:
                pass
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                try:
                    put(e)
                except _Stopped:
                    pass

        thread = threading.Thread(target=work, name="harvest-loader", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                rows, batch = item
                out = batch[self.cfg.hooks[0]] if self.single else batch
                yield (rows, out) if self.cfg.with_rows else out
        finally:  # consumer done or gone (break, exception, garbage collection): stop the producer
            stop.set()
            thread.join()


class _Stopped(Exception):
    pass


def batches(store: StoreReader, hooks: str | Iterable[str], batch_size: int, **options) -> Batches:
    """Shuffled batches of one hook ([B, d] arrays) or several ({hook: [B, d_hook]}, same rows).

    options: the fields of LoaderConfig. `segment` takes a name or a list of names.
    """
    single = isinstance(hooks, str)
    hooks = (hooks,) if single else tuple(hooks)
    seg = options.get("segment")
    if isinstance(seg, str):
        options["segment"] = (seg,)
    elif seg is not None:
        options["segment"] = tuple(seg)
    exclude = options.get("exclude", LoaderConfig.exclude)
    options["exclude"] = (exclude,) if isinstance(exclude, str) else tuple(exclude or ())
    if options.get("normalize") is True:
        options["normalize"] = "scale"
    elif options.get("normalize") is False:
        options["normalize"] = None
    return Batches(store, LoaderConfig(hooks, batch_size, **options), single)
