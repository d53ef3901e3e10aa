"""Checkpoints with orbax: OUT/checkpoints/<step>/{state, meta}.

`state` is the whole TrainState (parameters, Adam moments, step, dead-latent counters, metric sums);
`meta` (JSON) is the data stream's Position (epoch, batches consumed in it) and the session's
counters. orbax writes a checkpoint under a temporary name and renames it when complete, so a process
killed mid-save leaves the previous checkpoint as the latest; the next start restores it, the stream
skips to its Position, and the training continues bit for bit as if never stopped.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from harvest.sae.data import Position

__all__ = ["Checkpoints"]

# orbax reports every save and restore at INFO; the trainer prints its own line per checkpoint
logging.getLogger("absl").setLevel(logging.WARNING)


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, keep: int):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=False,  # the step's buffers are donated to the next step
            cleanup_tmp_directories=True,  # a save a kill cut short, redone when the resumed run gets there
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, position: Position, extra: dict) -> None:
        meta = {"step": step, "epoch": position.epoch, "batch": position.batch, **extra}
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, like, shardings) -> tuple[object, Position, dict]:
        """-> (state shaped and sharded like `like`, Position, meta) of checkpoint `step`."""
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), like, shardings)
        got = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        meta = dict(got["meta"])
        return got["state"], Position(int(meta["epoch"]), int(meta["batch"])), meta

    def close(self) -> None:
        self.manager.close()
