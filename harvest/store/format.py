"""The one schema of a harvest run folder: every column, code, path and file name, and the version.

docs/FORMAT.md is the public description of these facts; this module is where the code reads
them. It imports only numpy and harvest.store.location/objectstore (the standard library until a URL
is used), so the engine and the ARC package can use its vocabularies (phases, segments, stop
reasons) without pulling in zarr.

Run folder:
    RUN/run.json                      provenance + config (written by the run loop)
    RUN/summary.json                  scores and speed of the last session
    RUN/.lock                         flock held by the live harvest process
    RUN/.lock.pN                      flock of process N of a multi-process run (local folders)
    RUN/leases/pN.json                lease of process N (object stores: no flock there)
    RUN/shards/000012.zarr/           one complete Zarr v3 group (store.shard builds it)
    RUN/commits/000012.json           commit record, written LAST; only committed shards exist
    RUN/stats/<hook>.json|.npz|...    cached statistics (store.stats); never part of the data
    RUN/quarantine/<time>/            damaged shards and commit records moved aside by `harvest verify --repair`
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np

from harvest.floats import FLOAT_DTYPES
from harvest.store.location import TMP_MARK, URL, as_root
from harvest.store.objectstore import files_for

FORMAT_NAME = "harvest-activations"
FORMAT_VERSION = 3  # 2: per-chunk crc32c, every chunk written, a file manifest in each commit record
# 3: shared prompt prefixes: a sequence may store only the prompt rows past a prefix another sequence holds

CODECS = ("blosc-zstd", "zstd", "none")
STORAGE_DTYPES = FLOAT_DTYPES  # what the host can cast activations to (harvest.floats)

# ---------------------------------------------------------------- vocabularies (code -> name)

PHASES = {"prefill": 0, "decode": 1}
SEGMENTS = {"text": 0, "example_input": 1, "example_output": 2, "test_input": 3, "answer": 4}
# Why a row stopped generating; the engine's stop codes index this tuple.
STOP_REASONS = ("none", "eos", "stop_string", "max_new_tokens")

# ---------------------------------------------------------------- columns

# Per-token columns a record carries: name -> dtype.
TOKEN_COLUMNS = {
    "token_id": np.int32,
    "position": np.int32,
    "phase": np.int8,  # PHASES code
    "segment": np.int8,  # SEGMENTS code
    "example": np.int16,  # ARC demonstration index, -1 if none
    "row": np.int16,  # ARC cell row, -1 if the token is not a grid cell
    "col": np.int16,
}
# Per-token columns the shard builder derives: `sequence` (the sequence id) and `first_token`
# (position 0: the attention-sink row, masked by loaders, never dropped).
DERIVED_TOKEN_COLUMNS = {"sequence": np.int64, "first_token": np.bool_}

# Per-sequence columns: name -> kind. Missing or None values get the kind's fill value. Other
# keys of a record's meta are stored too, with an inferred kind.
SEQUENCE_COLUMNS = {
    "sequence_id": "int",
    "task_id": "str",
    "test_index": "int",
    "augmentation": "str",  # JSON
    "sample_index": "int",
    "prompt_length": "int",
    # Shared prompts (version 3): this sequence's first `shared_prompt_length` prompt rows are the first
    # rows of sequence `prompt_sequence_id`'s prompt and are stored there, not here (-1 and 0: none).
    "prompt_sequence_id": "int",
    "shared_prompt_length": "int",
    "generated_length": "int",
    "stop_reason": "str",  # one of STOP_REASONS
    "generated_text": "str",
    "parsed_ok": "bool",
    "pred_h": "int",
    "pred_w": "int",
    "shape_ok": "bool",
    "pixel_accuracy": "float",
    "correct": "bool",
    "logprob": "float",  # sum of the model's log-probabilities of the generated tokens
    "chat": "bool",  # the prompt used the chat template
    "has_target": "bool",  # the task's answer is known (scores are meaningful)
}
OFFSET_COLUMNS = ("token_offset", "token_count")  # where the sequence's tokens sit in the shard
KIND_DTYPE = {"int": np.int64, "float": np.float64, "bool": np.bool_, "str": str}
KIND_FILL = {"int": -1, "float": float("nan"), "bool": False, "str": ""}


# ---------------------------------------------------------------- paths

_SHARD_RE = re.compile(r"^(\d+)\.zarr$")
_COMMIT_RE = re.compile(r"^(\d+)\.json$")
_OWNED_RE = re.compile(r"^(\d+)\.(zarr|json)(\.tmp-|$)")  # a shard, a commit record, or a temp file of either
_PROCESS_LOCK_RE = re.compile(r"^\.lock\.p\d+$")


@dataclasses.dataclass(frozen=True)
class ProcessShare:
    """Process `index` of `count` writing one run folder: it owns the shard indices i with
    i % count == index, so shard names never collide across processes (docs/FORMAT.md,
    "Several processes"). The default, (0, 1), is a lone harvest: it owns every index."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not (isinstance(self.index, int) and isinstance(self.count, int) and 0 <= self.index < self.count):
            raise ValueError(f"process share {self.index} of {self.count}: want 0 <= index < count")

    def owns(self, shard_index: int) -> bool:
        return shard_index % self.count == self.index

    def first_after(self, shard_index: int) -> int:
        """The smallest index this process owns that is greater than shard_index (-1: the first one)."""
        k = shard_index + 1
        return k + (self.index - k) % self.count


LONE = ProcessShare()  # a lone harvest, the default everywhere a share is taken


@dataclasses.dataclass(frozen=True)
class StoreLayout:
    """Where everything of one run folder lives."""

    root: Path | URL  # a local folder, or an object-store URL (harvest.store.location)

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", as_root(root))

    @property
    def files(self):
        """The file operations for this run folder's storage (harvest.store.location)."""
        return files_for(self.root)

    @property
    def remote(self) -> bool:
        return isinstance(self.root, URL)

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def commits_dir(self) -> Path:
        return self.root / "commits"

    @property
    def stats_dir(self) -> Path:
        return self.root / "stats"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def process_lock_file(self, index: int) -> Path:
        """The flock of process `index` of a multi-process run (local folders)."""
        return self.root / f".lock.p{index}"

    @property
    def leases_dir(self) -> URL:
        """Object stores: one lease object per live process (harvest.store.lease)."""
        return self.root / "leases"

    def lease_path(self, index: int) -> URL:
        return self.leases_dir / f"p{index}.json"

    @property
    def quarantine_dir(self) -> Path:
        """Where `harvest verify --repair` moves damaged shards and their commit records."""
        return self.root / "quarantine"

    def entries(self) -> set[str]:
        """The names a run folder may hold at its top level."""
        return {
            p.name
            for p in (
                self.shards_dir,
                self.commits_dir,
                self.stats_dir,
                self.run_json,
                self.summary_json,
                self.lock_file,
                self.leases_dir,
                self.quarantine_dir,
            )
        }

    def is_lock(self, name: str) -> bool:
        """The run's locks (.lock, .lock.pN) and leases: what --overwrite keeps while it holds them."""
        return name in (self.lock_file.name, self.leases_dir.name) or bool(_PROCESS_LOCK_RE.match(name))

    def is_entry(self, name: str) -> bool:
        """Whether a top-level name belongs to a run folder (temp files by their final name)."""
        name = name.split(TMP_MARK)[0]
        return name in self.entries() or bool(_PROCESS_LOCK_RE.match(name))

    @staticmethod
    def shard_name(index: int) -> str:
        return f"{index:06d}.zarr"

    def shard_path(self, index: int) -> Path:
        return self.shards_dir / self.shard_name(index)

    def commit_path(self, index: int) -> Path:
        return self.commits_dir / f"{index:06d}.json"

    @staticmethod
    def shard_index(name: str) -> int | None:
        """`000012.zarr` -> 12; None for anything else."""
        m = _SHARD_RE.match(name)
        return int(m[1]) if m else None

    @staticmethod
    def owner_index(name: str) -> int | None:
        """The shard index a name of shards/ or commits/ belongs to, temp files included
        (`000012.zarr.tmp-1-ab` -> 12): which process may clean it up."""
        m = _OWNED_RE.match(name)
        return int(m[1]) if m else None

    @staticmethod
    def commit_index(name: str) -> int | None:
        """`000012.json` -> 12; None for anything else (temporary files included)."""
        m = _COMMIT_RE.match(name)
        return int(m[1]) if m else None
