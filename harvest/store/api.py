"""`Store`: the reader of a run folder plus its training-side reads (shuffled batches, statistics).

The reader knows nothing of the loader or the statistics; both read through it, and this module
joins them, so imports flow one way: format -> runfolder -> shard -> reader -> chunks -> stats ->
loader -> api.
"""

from __future__ import annotations

import os

from harvest.store.loader import batches
from harvest.store.reader import StoreReader
from harvest.store.stats import hook_stats

__all__ = ["Store", "open_store"]


class Store(StoreReader):
    """A run folder opened for reading (see harvest.data)."""

    def batches(self, hooks, batch_size: int, **options):
        """Shuffled batches: [B, d] for one hook (a str), {hook: [B, d_hook]} on the same rows for a
        list of hooks. Options: harvest.store.loader.LoaderConfig (shuffle, seed, epochs, phase, segment,
        exclude, process_index, process_count, dtype, normalize, drop_last, buffer_chunks, prefetch...)."""
        return batches(self, hooks, batch_size, **options)

    def stats(self, hook: str | None = None, recompute: bool = False, **options):
        """harvest.store.stats.HookStats for hook (all hooks as a dict if None), cached in RUN/stats/
        and in memory on this store (StoreReader.memo, shared with batches(normalize=...))."""
        if hook is None:
            return {h: self.stats(h, recompute, **options) for h in self.hooks}
        return hook_stats(self, hook, recompute=recompute, **options)


def open_store(path: str | os.PathLike) -> Store:
    """Open a run folder (a path, or a URL such as s3://bucket/runs/demo) for reading. Only committed
    shards are visible; nothing is modified."""
    return Store(path)
