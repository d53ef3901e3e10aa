"""Per-sequence tables: the run-wide table (`SequenceTable`), and which stored rows make up one
whole sequence when prompts share prefixes (format version 3).

A sequence S with `shared_prompt_length` P > 0 stores only its rows from prompt position P on; its
first P prompt rows are the first P prompt rows of sequence `prompt_sequence_id` (the donor: same
token ids at the same positions, hence the same activations). The donor may share a prefix of its
own, so S's prompt is rebuilt by walking the chain down: each donor lends the stored prompt rows it
holds below what is still missing, and its own donor the rest. The walk is a loop, not recursion:
chains can be as long as a run has samples of one prompt.

This module only plans (which rows of which shard, in position order) and checks; the reader reads.
It imports nothing of the reader, so imports flow one way (sequences -> reader).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from harvest.store.format import OFFSET_COLUMNS, SEQUENCE_COLUMNS
from harvest.store.location import StoreError

__all__ = [
    "SequenceTable",
    "join_tables",
    "StoredRows",
    "RowRange",
    "stored_rows",
    "plan_rows",
    "check_prompt_positions",
    "join",
    "not_committed",
]


class SequenceTable(dict):
    """Per-sequence columns (name -> [S] numpy array), in global token order of the sequences."""

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame({k: v for k, v in self.items()})

    def __len__(self) -> int:  # the number of rows, like a DataFrame; the columns are .keys()
        return len(next(iter(self.values()))) if super().__len__() else 0


def join_tables(tables: list[dict[str, np.ndarray]], counts: Sequence[int], offsets: Sequence[int]) -> SequenceTable:
    """Shard tables (each with counts[k] rows) as one table; a column missing in some shard is filled
    (-1, nan, '', False), and token_offset is made global by adding the shard's first row offsets[k]."""
    names: list[str] = list(SEQUENCE_COLUMNS) + list(OFFSET_COLUMNS)
    for t in tables:
        names += [c for c in t if c not in names]
    out = SequenceTable()
    for name in names:
        like = next((t[name] for t in tables if name in t), None)
        if like is None:
            continue
        parts = []
        for n, offset, t in zip(counts, offsets, tables):
            col = t.get(name)
            if col is None:
                col = np.full(n, _fill_for(like.dtype), dtype=like.dtype)
            parts.append(col + offset if name == "token_offset" else col)
        out[name] = np.concatenate(parts) if parts else like[:0]
    return out


def _fill_for(dtype: np.dtype) -> Any:
    return {"b": False, "i": -1, "u": 0, "f": np.nan}.get(dtype.kind, "")


def join(parts: list[np.ndarray]) -> np.ndarray:
    """The parts of one sequence's column in order (no copy for a sequence stored whole)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclasses.dataclass(frozen=True)
class StoredRows:
    """One committed sequence's table row: where its stored rows sit and what it shares."""

    shard: int  # position in StoreReader.shards
    start: int  # its first row in that shard
    count: int  # rows stored (token_count)
    prompt_length: int  # the full prompt, shared rows included (-1: unknown)
    shared_length: int  # shared_prompt_length; <= 0: shares nothing (also -1 = missing, and version 1-2)
    donor: int  # prompt_sequence_id


@dataclasses.dataclass(frozen=True)
class RowRange:
    """Rows [start, stop) of the shard at position `shard` in StoreReader.shards."""

    shard: int
    start: int
    stop: int


def stored_rows(table: dict[str, np.ndarray], shard: int, row: int) -> StoredRows:
    """Row `row` of the sequence table of the shard at position `shard`."""

    def value(name: str) -> int:  # version 1-2 shards have no sharing columns: -1, shares nothing
        return int(table[name][row]) if name in table else -1

    start, count = int(table["token_offset"][row]), int(table["token_count"][row])
    return StoredRows(
        shard, start, count, value("prompt_length"), value("shared_prompt_length"), value("prompt_sequence_id")
    )


def shares_prompt(rows: StoredRows) -> bool:
    return rows.shared_length > 0


def _inconsistent(root, sid: int, why: str) -> StoreError:
    return StoreError(
        f"{root}: sequence {sid} cannot be rebuilt from its shared prompt: {why}; run `harvest verify --deep {root}`"
    )


def not_committed(root, link: int, shared: int, donor: int, sid: int) -> StoreError:
    """The one error for a donor that is missing: its run is unfinished (or another process of it
    has not committed the donor yet)."""
    via = f" (sequence {sid} reads its prompt through sequence {link})" if link != sid else ""
    return StoreError(
        f"sequence {link} shares its first {shared} prompt rows with sequence {donor}, which is not committed "
        f"in {root}{via}; finish the run (re-run the same harvest command) and read again"
    )


def plan_rows(sid: int, locate: Callable[[int], StoredRows | None], root) -> list[RowRange]:
    """The row ranges that make up sequence `sid` whole, in position order: the borrowed prompt rows
    (deepest donor first), then sid's own stored rows. locate(id) -> its StoredRows, None if that
    sequence is not committed; locate(sid) must not be None.

    Checks what the tables say (donors committed, earlier ids, lengths that fit); the positions of
    the rows read are checked afterwards by check_prompt_positions. Raises StoreError; never returns
    a partial sequence."""
    own = locate(sid)
    assert own is not None, sid
    ranges = [RowRange(own.shard, own.start, own.start + own.count)]
    if not shares_prompt(own):
        return ranges
    if own.shared_length > own.prompt_length:
        raise _inconsistent(
            root, sid, f"it shares {own.shared_length} prompt rows of a {own.prompt_length}-token prompt"
        )
    need = own.shared_length  # prompt positions [0, need) are still to be found
    link_id, link = sid, own
    while need > 0:
        donor_id = link.donor
        if not 0 <= donor_id < link_id:  # donors are earlier sequences: the walk always ends
            raise _inconsistent(root, sid, f"sequence {link_id} names sequence {donor_id} as its prompt's donor")
        donor = locate(donor_id)
        if donor is None:
            raise not_committed(root, link_id, link.shared_length, donor_id, sid)
        if link.shared_length > donor.prompt_length:
            raise _inconsistent(
                root,
                sid,
                f"sequence {link_id} shares {link.shared_length} prompt rows with sequence {donor_id}, "
                f"whose prompt has {donor.prompt_length}",
            )
        lent_from = max(donor.shared_length, 0)  # the donor's stored rows start at this position
        if lent_from < need:
            take = need - lent_from  # the donor's stored prompt positions [lent_from, need)
            if take > donor.count:
                raise _inconsistent(
                    root,
                    sid,
                    f"sequence {donor_id} stores {donor.count} rows, not its prompt rows {lent_from}..{need - 1}",
                )
            ranges.append(RowRange(donor.shard, donor.start, donor.start + take))
            need = lent_from
        link_id, link = donor_id, donor
    return ranges[::-1]


def check_prompt_positions(root, sid: int, position: np.ndarray, prompt_length: int) -> None:
    """A rebuilt sequence's first prompt_length rows must be positions 0..prompt_length-1, each once
    (a donor's rows that are not what its table says are refused, not returned). position: [T]."""
    head = np.asarray(position[:prompt_length], dtype=np.int64)  # [min(T, prompt_length)]
    if len(head) < prompt_length:
        raise _inconsistent(root, sid, f"its {prompt_length}-token prompt reads back as {len(head)} rows")
    wrong = np.flatnonzero(head != np.arange(prompt_length))
    if wrong.size:
        row = int(wrong[0])
        raise _inconsistent(root, sid, f"its prompt row {row} reads back at position {int(head[row])}")
