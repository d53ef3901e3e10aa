"""torch tensors from a harvest store: `store.batches(...)` (harvest.store.loader) as torch, and a SAELens provider.

    import torch
    from harvest.data import open_store
    from harvest.torch import batches, TorchDataProvider

    store = open_store("outputs/demo")
    for x in batches(store, "blocks.0.hook_resid_post", 4096, dtype=torch.bfloat16, seed=0):
        ...  # x: torch [4096, d], the loader's rows in the loader's order, bit-exact bfloat16
    provider = TorchDataProvider(store, "blocks.0.hook_resid_post", 4096)  # endless, full batches
    SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider).fit()

The loader does all the reading, filtering and shuffling (same options, same rows, same order as
`store.batches`); this module only turns its numpy batches into tensors. bfloat16 goes through the
bits (numpy bfloat16 -> int16 -> torch.bfloat16), never through float32, so it is bit-exact; float32
from a bfloat16 or float16 store is exact too.

torch is optional: `harvest` and `harvest.data` never import it; importing this module without torch
raises TorchMissingError (an ImportError), one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np

from harvest.errors import FieldError, HarvestError


class TorchMissingError(HarvestError, ImportError):
    """harvest.torch was imported where PyTorch is not installed."""


try:
    import torch
except ImportError:  # a one-line error, not a traceback into torch's absence
    raise TorchMissingError(
        "harvest.torch needs PyTorch, which is not installed: pip install torch (harvest.data works without it)"
    ) from None

__all__ = ["batches", "TorchBatches", "TorchDataProvider", "TorchMissingError", "to_torch"]

# torch dtype -> what the loader is asked for (its `dtype` option): the cast happens in numpy, where
# ml_dtypes' bfloat16 casts round to nearest even and a bfloat16 store needs no cast at all
_LOADER_DTYPE = {torch.float32: np.dtype(np.float32), torch.bfloat16: np.dtype(ml_dtypes.bfloat16)}
_LOADER_DTYPE[torch.float16] = np.dtype(np.float16)


def _torch_dtype(dtype: Any) -> torch.dtype:
    """torch.float32 / torch.bfloat16 / torch.float16, or their names ("bfloat16")."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if dtype not in _LOADER_DTYPE:
        raise FieldError("dtype", f"{dtype!r} is not one of torch.float32, torch.bfloat16, torch.float16")
    return dtype


def to_torch(x: np.ndarray) -> torch.Tensor:
    """A numpy batch as a CPU tensor sharing its memory; numpy bfloat16 is reinterpreted bit for bit."""
    x = np.ascontiguousarray(x)
    if x.dtype == ml_dtypes.bfloat16:  # torch.from_numpy refuses ml_dtypes' bfloat16: go through the bits
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


class TorchBatches:
    """`store.batches(...)` with torch tensors: [B, d] for one hook (a str), {hook: [B, d_hook]} for a list.

    Re-iterable like the loader (each iter() is a fresh pass); len(), batches_per_epoch() and
    rows_per_epoch are the loader's. With `with_rows=True` it yields (rows, batch), rows [B] int64
    numpy global row ids (they index store.tokens(...), which is numpy).
    """

    def __init__(
        self,
        store,
        hooks,
        batch_size: int,
        dtype: Any = torch.float32,
        device: str | torch.device = "cpu",
        pin_memory: bool = False,
        **loader_options,
    ):
        self.dtype = _torch_dtype(dtype)
        self.device = torch.device(device)
        if pin_memory and self.device.type != "cuda":
            raise FieldError("pin_memory", f"True only helps copies to a CUDA device; device is {str(self.device)!r}")
        self.pin_memory = pin_memory
        # all loader checks (hooks, filters, process share) happen here, before any batch is read
        self.loader = store.batches(hooks, batch_size, dtype=_LOADER_DTYPE[self.dtype], **loader_options)
        self.with_rows = bool(loader_options.get("with_rows", False))

    def __len__(self) -> int:
        return len(self.loader)

    def batches_per_epoch(self) -> int:
        return self.loader.batches_per_epoch()

    @property
    def rows_per_epoch(self) -> int:
        return self.loader.rows_per_epoch

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        t = to_torch(x)  # [B, d] on the CPU, no copy
        if self.pin_memory:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=self.pin_memory)  # a no-op on the CPU

    def _convert(self, batch):
        if isinstance(batch, dict):
            return {h: self._tensor(x) for h, x in batch.items()}
        return self._tensor(batch)

    def __iter__(self) -> Iterator:
        items = iter(self.loader)
        try:
            for item in items:
                if self.with_rows:
                    rows, batch = item
                    yield rows, self._convert(batch)
                else:
                    yield self._convert(item)
        finally:  # stopped early (break, close, garbage collection): the loader stops its threads now
            items.close()


def batches(
    store,
    hooks,
    batch_size: int,
    dtype: Any = torch.float32,
    device: str | torch.device = "cpu",
    pin_memory: bool = False,
    **loader_options,
) -> TorchBatches:
    """Shuffled torch batches of one hook ([B, d]) or several ({hook: [B, d_hook]}, the same token rows).

    dtype: torch.float32 (default), torch.bfloat16 or torch.float16. device: where the tensors go;
    pin_memory: stage each batch in pinned host memory for an asynchronous copy to a CUDA device.
    loader_options: those of `store.batches` (docs/TRAINING.md: seed, epochs, phase, segment, exclude,
    process_index, process_count, normalize, drop_last, ...), with the same meaning and the same rows.
    """
    return TorchBatches(store, hooks, batch_size, dtype, device, pin_memory, **loader_options)


class TorchDataProvider(Iterator):
    """An iterator of torch batches for SAELens' trainers, which call next() on it once per step:
    `SAETrainer(cfg=..., sae=..., data_provider=TorchDataProvider(store, hook, B))` ([B, d_in] tensors,
    sae_lens.training.types.DataProvider), or `MultiSAETrainer` with a list of hooks
    ({hook: [B, d_hook]}, a MultiHookDataProvider).

    Unlike `batches`, it repeats forever (epochs=None: a fresh permutation each epoch; the trainer
    stops at its total_training_samples) and yields only full batches (drop_last=True: SAETrainer
    counts every step as train_batch_size_samples rows), unless told otherwise. Set the trainer's
    train_batch_size_samples to the same batch_size. close() (or `with`) stops the loader's threads.
    """

    def __init__(
        self,
        store,
        hooks,
        batch_size: int,
        dtype: Any = torch.float32,
        device: str | torch.device = "cpu",
        pin_memory: bool = False,
        epochs: int | None = None,
        drop_last: bool = True,
        **loader_options,
    ):
        if loader_options.get("with_rows"):
            raise FieldError("with_rows", "True is impossible here: SAELens trainers take tensors, not (rows, batch)")
        self.batches = TorchBatches(
            store, hooks, batch_size, dtype, device, pin_memory, epochs=epochs, drop_last=drop_last, **loader_options
        )
        self.batch_size = batch_size
        self.steps = 0  # batches handed out so far
        self.iterator = iter(self.batches)

    def __iter__(self) -> TorchDataProvider:
        return self

    def __next__(self):
        batch = next(self.iterator)
        self.steps += 1
        return batch

    def close(self) -> None:
        """Stop the loader's background thread (a generator's close: its `finally` stops the producer)."""
        self.iterator.close()

    def __enter__(self) -> TorchDataProvider:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
