"""BackgroundWriter: record building and Zarr writes in one thread, behind a bounded queue.

The main thread puts a callable per item (e.g. `lambda: [builder.record(done, seq, prompt)]`); the
writer thread calls it, so building the record overlaps the engine's next steps. The queue holds at most
`max_queue` items, so a slow disk blocks `put` (backpressure) instead of growing host RAM.
Sequences accumulate until the next one would push the shard past `shard_bytes`; then the shard is
written whole and committed (harvest.store.ShardWriter). A writer error is re-raised in the main
thread by the next `put` or by `close`.
"""

from __future__ import annotations

import dataclasses
import errno
import queue
import threading
import time
from collections.abc import Iterable
from typing import Any

from harvest import hostmem
from harvest.errors import HarvestError
from harvest.store.format import PHASES
from harvest.store.runfolder import StoreError
from harvest.store.shard import DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES, SequenceRecord, ShardWriter

__all__ = ["BackgroundWriter", "SequenceRecord", "WriterError", "WriterStats"]

_STOP = object()


class WriterError(HarvestError, RuntimeError):
    """Raised in the main thread when the writer thread failed; the cause is chained."""


@dataclasses.dataclass
class WriterStats:
    bytes_written: int = 0  # on disk, whole committed shards
    acts_bytes_written: int = 0  # on disk, activations only
    acts_raw_bytes: int = 0  # activations in storage dtype before compression
    tokens_written: int = 0
    sequences_written: int = 0
    shards_written: int = 0
    tokens_per_phase: dict = dataclasses.field(default_factory=lambda: {p: 0 for p in PHASES})
    shard_indices: list = dataclasses.field(default_factory=list)
    copy_seconds: float = 0.0  # time inside the put callables (device->host)
    write_seconds: float = 0.0  # time building and committing shards
    pending_sequences: int = 0  # accepted but not yet committed

    @property
    def compression_ratio(self) -> float:
        return self.acts_raw_bytes / self.acts_bytes_written if self.acts_bytes_written else float("nan")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"compression_ratio": self.compression_ratio}


class BackgroundWriter:
    """Accumulate SequenceRecords into shards and write them in a background thread.

    put(item): item is a SequenceRecord, an iterable of them, or a callable returning either
    (or None). Blocks while `max_queue` items wait. Shards get indices start_shard, start_shard +
    shard_stride, ...: process p of n passes scan_run(..., share).next_shard and stride n, so it
    writes only the indices it owns (harvest.store.format.ProcessShare).
    """

    def __init__(
        self,
        run_dir,
        hooks: dict[str, int],
        storage_dtype: str = "bfloat16",
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        codec: str = "blosc-zstd",
        max_queue: int = 4,
        start_shard: int = 0,
        codec_level: int = 1,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        fsync: bool = True,
        threads: int | None = None,
        shard_stride: int = 1,
    ):
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        if shard_stride < 1:
            raise ValueError("shard_stride must be >= 1")
        self._shard = ShardWriter(run_dir, hooks, storage_dtype, codec, codec_level, chunk_bytes, fsync, threads)
        self.shard_bytes = int(shard_bytes)
        self._next_index = int(start_shard)
        self._stride = int(shard_stride)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._stats = WriterStats()
        self._error: BaseException | None = None
        self._closed = False
        self._pending: list[SequenceRecord] = []
        self._pending_bytes = 0
        self._thread = threading.Thread(target=self._run, name="harvest-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ main thread

    @property
    def stats(self) -> WriterStats:
        """A consistent snapshot of the live counters (safe to read from any thread)."""
        with self._lock:
            return dataclasses.replace(
                self._stats,
                tokens_per_phase=dict(self._stats.tokens_per_phase),
                shard_indices=list(self._stats.shard_indices),
            )

    def put(self, item: Any) -> None:
        if self._closed:
            raise WriterError("put() after close()")
        self._enqueue(item)

    def close(self) -> WriterStats:
        """Flush the last partial shard, join the thread, re-raise any writer error. -> final stats."""
        if not self._closed:
            self._closed = True
            if self._error is None:
                self._enqueue(_STOP)
        self._thread.join()
        self._raise_if_failed()
        return self.stats

    def abort(self) -> None:
        """Stop without flushing the pending partial shard (uncommitted data is simply not there)."""
        self._closed = True
        self._error = self._error or _Aborted()
        self._thread.join()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the caller's exception; complete sequences already queued are still flushed
            try:
                self.close()
            except WriterError:
                pass

    def _enqueue(self, item: Any) -> None:
        # a timed loop so that a dead writer thread cannot leave put() blocked forever
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        err = self._error
        if err is not None and not isinstance(err, _Aborted):
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                raise WriterError(
                    f"disk full writing shard {self._next_index} of {self._shard.layout.root}: complete shards "
                    f"are committed; free space and run the same command again to resume"
                ) from err
            raise WriterError(f"background writer failed: {type(err).__name__}: {err}") from err

    # ------------------------------------------------------------ writer thread

    def _run(self) -> None:
        try:
            while self._error is None:
                try:
                    item = self._queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _STOP:
                    self._flush()
                    return
                t0 = time.perf_counter()
                records = _resolve(item)
                with self._lock:
                    self._stats.copy_seconds += time.perf_counter() - t0
                for rec in records:
                    self._add(rec)
                del item, records  # the engine's arrays for this sequence: free them before trimming
                hostmem.release()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self._error = e

    def _add(self, rec: SequenceRecord) -> None:
        rec = self._shard.prepare_record(rec)
        size = self._shard.record_bytes(rec)
        # a sequence never spans two shards; one larger than shard_bytes gets a shard of its own
        if self._pending and self._pending_bytes + size > self.shard_bytes:
            self._flush()
        self._pending.append(rec)
        self._pending_bytes += size
        with self._lock:
            self._stats.pending_sequences = len(self._pending)

    def _flush(self) -> None:
        if not self._pending:
            return
        t0 = time.perf_counter()
        info = self._shard.write(self._next_index, self._pending)
        self._next_index += self._stride
        self._pending, self._pending_bytes = [], 0
        hostmem.release(force=True)  # a whole shard's buffers were just freed
        with self._lock:
            s = self._stats
            s.write_seconds += time.perf_counter() - t0
            s.bytes_written += info["bytes"]
            s.acts_bytes_written += info["acts_bytes"]
            s.acts_raw_bytes += info["acts_raw_bytes"]
            s.tokens_written += info["num_tokens"]
            s.sequences_written += info["num_sequences"]
            s.shards_written += 1
            s.shard_indices.append(info["shard"])
            s.pending_sequences = 0
            for p, c in info["tokens_per_phase"].items():
                s.tokens_per_phase[p] = s.tokens_per_phase.get(p, 0) + c


class _Aborted(Exception):
    pass


def _resolve(item: Any) -> Iterable[SequenceRecord]:
    if callable(item) and not isinstance(item, SequenceRecord):
        item = item()
    if item is None:
        return []
    if isinstance(item, SequenceRecord):
        return [item]
    items = list(item)
    for r in items:
        if not isinstance(r, SequenceRecord):
            raise StoreError(f"expected SequenceRecord, got {type(r).__name__}")
    return items
