"""Operations on a run folder: atomic JSON files, run.json, the commit records, the lock, and the
resume scan. Where things live is `harvest.store.format.StoreLayout`; docs/FORMAT.md is the contract.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from harvest import failpoints
from harvest.errors import HarvestError
from harvest.store.format import TMP_MARK, StoreLayout


class StoreError(HarvestError, RuntimeError):
    """A malformed record or an inconsistent run folder."""


# ---------------------------------------------------------------- small file helpers


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath), directory=True)


def tmp_path(path: Path) -> Path:
    """A unique temporary sibling of `path`, for write-then-rename; the resume scan removes leftovers."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def write_json_atomic(path: Path, obj: Any, fsync: bool = True, failpoint: str | None = None) -> None:
    """tmp file + rename: readers see the old file, the new file, or nothing; never half a file.
    failpoint names the crash points before and after the rename (harvest.failpoints)."""
    tmp = tmp_path(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=json_default)
        f.write("\n")
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    if failpoint:
        failpoints.hit(f"{failpoint}.before_rename")
    os.replace(tmp, path)
    if failpoint:
        failpoints.hit(f"{failpoint}.renamed")
    if fsync:
        fsync_path(path.parent, directory=True)


def json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, os.PathLike)):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_run_metadata(run_dir: str | os.PathLike, meta: dict) -> None:
    """Write RUN/run.json atomically (the run loop calls this at start and again at the end)."""
    layout = StoreLayout(run_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.run_json, meta, failpoint="run_json")


def read_json(path: Path, what: str, fix: str) -> Any:
    """A JSON file of the run folder; StoreError naming the file, line and column if it is damaged."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}:{e.lineno}:{e.colno}: {what} is not valid JSON ({e.msg}); {fix}") from None
    except UnicodeDecodeError:
        raise StoreError(f"{path}: {what} is not UTF-8 text; {fix}") from None


def read_run_metadata(run_dir: str | os.PathLike) -> dict:
    """RUN/run.json as a dict; FileNotFoundError if the run has none yet."""
    layout = StoreLayout(run_dir)
    meta = read_json(layout.run_json, "run.json", "restore it from a copy (or start over with --overwrite)")
    if not isinstance(meta, dict):
        raise StoreError(f"{layout.run_json}: run.json is not a JSON object; restore it")
    return meta


# ---------------------------------------------------------------- resume


@dataclasses.dataclass
class ScanResult:
    committed_sequence_ids: set[int]
    next_shard: int
    shards: list[int]  # committed shard indices, ascending
    num_tokens: int
    removed: list[str]  # leftovers deleted, relative to the run folder


def lock_run(run_dir):
    """Hold an exclusive lock on RUN/.lock for as long as the returned file stays open.

    Raises StoreError if another live process holds it (a crashed process releases it), so two
    harvests never write, or clean up, the same folder at once.
    """
    import fcntl

    layout = StoreLayout(run_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    f = open(layout.lock_file, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise StoreError(f"{layout.root} is in use by another harvest process") from None
    f.seek(0), f.truncate(), f.write(f"{os.getpid()}\n"), f.flush()
    return f


def read_commits(run_dir) -> dict[int, dict]:
    """Committed shard index -> commit record. Ignores tmp files; raises if a record is unreadable."""
    layout = StoreLayout(run_dir)
    out = {}
    if not layout.commits_dir.is_dir():
        return out
    for p in layout.commits_dir.iterdir():
        i = StoreLayout.commit_index(p.name)
        if i is not None:
            fix = f"run `harvest verify --repair {layout.root}` to re-harvest shard {i}"
            out[i] = read_json(p, "commit record", fix)
            if not isinstance(out[i], dict) or not {"num_tokens", "sequence_ids", "hooks"} <= out[i].keys():
                raise StoreError(f"{p}: commit record lacks its fields; run `harvest verify --repair {layout.root}`")
    return dict(sorted(out.items()))


def find_leftovers(layout: StoreLayout, committed: set[int]) -> list[Path]:
    """What a crash leaves behind: temp shard dirs (`*.zarr.tmp-*`), temp commit and run.json files (`*.tmp-*`),
    `*.partial` files that zarr's local store can leave, and shard dirs without a commit record."""
    out: list[Path] = []
    if layout.root.is_dir():  # run.json / summary.json written half-way (tmp file + rename)
        out += [p for p in sorted(layout.root.iterdir()) if TMP_MARK in p.name and p.is_file()]
    if layout.commits_dir.is_dir():
        out += [p for p in sorted(layout.commits_dir.iterdir()) if TMP_MARK in p.name]
    if layout.shards_dir.is_dir():
        for p in sorted(layout.shards_dir.iterdir()):
            i = StoreLayout.shard_index(p.name)
            if TMP_MARK in p.name or (i is not None and i not in committed):
                out.append(p)
        inside = set(out)
        out += [p for p in sorted(layout.shards_dir.rglob("*.partial")) if not inside & set(p.parents)]
    return out


def scan_run(run_dir, clean: bool = True) -> ScanResult:
    """For resume: delete crash leftovers (find_leftovers), return what is committed and the next
    shard index. Other files are left alone. Call it only when no other process writes to this run
    folder."""
    layout = StoreLayout(run_dir)
    commits = read_commits(run_dir)
    removed = [str(p.relative_to(layout.root)) for p in find_leftovers(layout, set(commits))]
    if clean:
        for rel in removed:
            p = layout.root / rel
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    seen: set[int] = set()
    for i, rec in commits.items():
        if not layout.shard_path(i).is_dir():
            raise StoreError(
                f"{layout.commit_path(i)} exists but its shard {layout.shard_path(i)} is missing; "
                f"run `harvest verify --repair {layout.root}`, then the harvest again to regenerate it"
            )
        ids = set(rec["sequence_ids"])
        if ids & seen:
            raise StoreError(f"shard {i} repeats sequence ids already committed: {sorted(ids & seen)[:5]}")
        seen |= ids
    return ScanResult(
        seen, max(commits, default=-1) + 1, list(commits), sum(r["num_tokens"] for r in commits.values()), removed
    )
