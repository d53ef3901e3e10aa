"""Training and held-out rows from a harvest store: the sequence split, the resumable batch stream,
the evaluation set and the initialisation sample.

Held-out split. A sequence is held out when a hash of its id (splitmix64, fixed salt) falls below
`data.eval_fraction`: the choice depends on the id alone, so it never changes with the seed, the
filters or shards added later, and no training batch ever holds a row of a held-out sequence. (A
store too small for the fraction to pick any sequence holds out the one with the smallest hash.)

Stream. The loader (store.batches) cannot filter by sequence, so each epoch is one loader pass
(`with_rows=True`, its own seed) whose batches lose their held-out rows and are re-cut into exact
`batch_size` batches; the partial batch at an epoch's end is dropped, so batches never straddle
epochs. The stream is a pure function of the store, the filters, the seed and (epoch, batch), and a
resumed training continues at the recorded Position: the loader cannot start mid-epoch, so the
epoch's first `batch` batches are read again and skipped (at most one epoch of reading). With a
loader option `start_batch` (skip a plan's first rows without decoding them) this would be free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from harvest.errors import FieldError, HarvestError
from harvest.sae.config import TrainConfig
from harvest.store.loader import LoaderConfig, select_rows
from harvest.store.reader import StoreReader

__all__ = ["DataError", "Position", "Batch", "TrainData", "heldout_sequences"]


class DataError(HarvestError, ValueError):
    """The store and the data section leave nothing to train or evaluate on."""


@dataclasses.dataclass(frozen=True)
class Position:
    """Where the stream is: `batch` batches of epoch `epoch` consumed."""

    epoch: int = 0
    batch: int = 0


@dataclasses.dataclass(frozen=True)
class Batch:
    after: Position  # the stream's position once this batch is consumed
    x: np.ndarray  # [B, d_in] float32, raw
    y: np.ndarray  # [B, d_out] float32, raw (x itself for an SAE)
    phase: np.ndarray  # [B] int8: 0 prefill (prompt), 1 decode (answer)
    rows: np.ndarray  # [B] int64 global row ids


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each uint64 (Steele et al.'s SplitMix64 finaliser)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def heldout_sequences(sequence_ids: np.ndarray, fraction: float) -> np.ndarray:
    """[S] sequence ids -> [S] bool, True for the held-out ones (see the module docstring)."""
    salt = np.uint64(0x5AE5)  # fixed: the split must not move with any training option
    u = (_splitmix64(sequence_ids.astype(np.int64).view(np.uint64) ^ salt) >> np.uint64(11)) / float(2**53)  # [S]
    held = u < fraction
    if fraction > 0 and not held.any() and len(u) > 1:
        held[np.argmin(u)] = True
    return held


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class TrainData:
    """The rows of a config's data section: training stream, held-out rows, per-row phase."""

    def __init__(self, store: StoreReader, cfg: TrainConfig):
        d = cfg.data
        self.store, self.cfg = store, cfg
        self.hook_in, self.hook_out = d.hooks
        self.hooks = tuple(dict.fromkeys(d.hooks))  # one hook for an SAE
        self.batch_size = cfg.train.batch_size
        self.options = dict(
            phase=d.phase,
            segment=None if d.segment is None else tuple(d.segment),
            exclude=tuple(d.exclude),
            buffer_chunks=d.buffer_chunks,
        )
        for h in self.hooks:
            try:
                store.check_hook(h)
            except KeyError as e:
                key = (
                    "data.hook"
                    if cfg.data.hook is not None
                    else ("data.hook_in" if h == d.hook_in else "data.hook_out")
                )
                raise DataError(f"{key}: {e.args[0]}") from None
        try:
            selected = select_rows(store, LoaderConfig(self.hooks, self.batch_size, **self.options))  # [N]
        except FieldError as e:  # the loader's own option names are this section's keys
            raise DataError(f"data.{e.field}: {e.message}") from None
        seqs = store.token_column("sequence")  # [N]
        ids = np.unique(seqs)
        held_ids = ids[heldout_sequences(ids, d.eval_fraction)]
        held = np.isin(seqs, held_ids)  # [N]
        self.train_rows = selected & ~held  # [N]
        self.eval_rows = np.flatnonzero(selected & held)  # [E]
        self.heldout_ids = held_ids
        self.phase = store.token_column("phase")  # [N] int8
        self.num_train = int(self.train_rows.sum())
        if self.num_train < self.batch_size:
            raise DataError(
                f"data: {self.num_train:,} training rows in {store.root} after the filters and the held-out "
                f"{len(held_ids)} of {len(ids)} sequences, fewer than train.batch_size={self.batch_size}; "
                "lower train.batch_size or data.eval_fraction, or loosen the filters"
            )

    @property
    def widths(self) -> tuple[int, int]:
        return self.store.hook_widths[self.hook_in], self.store.hook_widths[self.hook_out]

    def batches(self, start: Position = Position()) -> Iterator[Batch]:
        """Exact batches of training rows from `start` on, forever (epoch after epoch)."""
        B, epoch = self.batch_size, start.epoch
        while True:
            loader = self.store.batches(
                list(self.hooks),
                B,
                seed=_epoch_seed(self.cfg.train.seed, epoch),
                epochs=1,
                with_rows=True,
                dtype="float32",
                **self.options,
            )
            parts: list[tuple[np.ndarray, dict]] = []
            have, emitted = 0, 0
            for rows, xs in loader:
                keep = self.train_rows[rows]  # [b] the loader knows nothing of the held-out split
                if not keep.any():
                    continue
                parts.append((rows[keep], {h: x[keep] for h, x in xs.items()}))
                have += int(keep.sum())
                while have >= B:
                    rows_all = np.concatenate([p[0] for p in parts])
                    xs_all = {h: np.concatenate([p[1][h] for p in parts]) for h in self.hooks}
                    emitted += 1
                    if epoch > start.epoch or emitted > start.batch:  # else: a resumed stream's skipped batch
                        r = rows_all[:B]
                        x, y = xs_all[self.hook_in][:B], xs_all[self.hook_out][:B]
                        yield Batch(Position(epoch, emitted), x, y, self.phase[r], r)
                    parts = [(rows_all[B:], {h: v[B:] for h, v in xs_all.items()})]
                    have -= B
            if emitted == 0:  # cannot happen with num_train >= B; guards against an endless loop
                raise DataError(f"data: epoch {epoch} of {self.store.root} gave no batch")
            epoch += 1

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first >= n training rows of epoch 0 ([n', d_in], [n', d_out]): the initialisation sample."""
        xs, ys, have = [], [], 0
        stream = self.batches()
        while have < n:
            b = next(stream)
            xs.append(b.x)
            ys.append(b.y)
            have += len(b.x)
        stream.close()  # stops the loader's read-ahead thread
        return np.concatenate(xs)[:n], np.concatenate(ys)[:n]

    def eval_set(self, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Held-out rows (evenly spaced if more than `limit`): x [E, d_in], y [E, d_out], phase [E]."""
        rows = self.eval_rows
        if len(rows) > limit:
            rows = rows[np.unique(np.linspace(0, len(rows) - 1, limit).astype(np.int64))]
        x = self.store.activations(self.hook_in, dtype="float32")[rows]
        y = x if self.hook_out == self.hook_in else self.store.activations(self.hook_out, dtype="float32")[rows]
        return x, y, self.phase[rows]
