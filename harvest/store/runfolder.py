"""Operations on a run folder: atomic JSON files, run.json, the commit records, the lock, and the
resume scan. Where things live is `harvest.store.format.StoreLayout`; docs/FORMAT.md is the contract.
A run folder is a local folder or an object-store URL: every file operation goes through
`harvest.store.location`, which keeps a local folder's temp-file + fsync + rename protocol.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from harvest.store.format import LONE, TMP_MARK, ProcessShare, StoreLayout
from harvest.store.location import (  # noqa: F401 - re-exported: the store's modules import them from here
    URL,
    StoreError,
    as_root,
    fsync_path,
    fsync_tree,
    json_default,
    tmp_path,
)
from harvest.store.objectstore import files_for

# ---------------------------------------------------------------- small file helpers


def write_json_atomic(path: Path | URL, obj: Any, fsync: bool = True, failpoint: str | None = None) -> None:
    """Readers see the old file, the new file, or nothing; never half a file. Local: tmp file + fsync +
    rename; object stores: one PUT. failpoint names the crash points before and after the rename (or
    the PUT) (harvest.failpoints)."""
    files_for(path).write_json(path, obj, fsync=fsync, failpoint=failpoint)


def write_run_metadata(run_dir: str | os.PathLike, meta: dict) -> None:
    """Write RUN/run.json atomically (the run loop calls this at start and again at the end)."""
    layout = StoreLayout(run_dir)
    layout.files.mkdir(layout.root)
    write_json_atomic(layout.run_json, meta, failpoint="run_json")


def parse_json(data: bytes, path, what: str, fix: str) -> Any:
    """A JSON file of the run folder; StoreError naming the file, line and column if it is damaged."""
    try:
        return json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}:{e.lineno}:{e.colno}: {what} is not valid JSON ({e.msg}); {fix}") from None
    except UnicodeDecodeError:
        raise StoreError(f"{path}: {what} is not UTF-8 text; {fix}") from None


def read_json(path: Path | URL, what: str, fix: str) -> Any:
    return parse_json(files_for(path).read_bytes(path), path, what, fix)


def read_run_metadata(run_dir: str | os.PathLike) -> dict:
    """RUN/run.json as a dict; FileNotFoundError if the run has none yet."""
    layout = StoreLayout(run_dir)
    meta = read_json(layout.run_json, "run.json", "restore it from a copy (or start over with --overwrite)")
    if not isinstance(meta, dict):
        raise StoreError(f"{layout.run_json}: run.json is not a JSON object; restore it")
    return meta


class NotARunError(StoreError, FileNotFoundError):
    """open_store was given a path that is not a run folder."""


def check_run_folder(layout: StoreLayout) -> None:
    """Raise NotARunError, with a hint, unless layout.root is a run folder (it has commits/ or run.json)."""
    root, files = layout.root, layout.files
    if not files.is_dir(root):
        raise NotARunError(f"no run folder at {root}")
    if files.is_dir(layout.commits_dir) or files.is_file(layout.run_json):
        return
    if StoreLayout.shard_index(root.name) is not None and files.is_file(root / "zarr.json"):
        raise NotARunError(f"{root} is one shard of a run; open the run folder {root.parent.parent} instead")
    raise NotARunError(
        f"{root} is not a harvest run folder (it has no commits/ or run.json); open the folder a harvest's "
        f"output.path names"
    )


# ---------------------------------------------------------------- resume


@dataclasses.dataclass
class ScanResult:
    committed_sequence_ids: set[int]
    next_shard: int
    shards: list[int]  # committed shard indices, ascending
    num_tokens: int
    removed: list[str]  # leftovers deleted, relative to the run folder


def lock_run(run_dir, share: ProcessShare = LONE):
    """Hold the run folder for this process until the returned object is closed (a context manager).

    Local folder, a lone harvest (share.count 1): an exclusive flock on RUN/.lock, exactly as always.
    Process N of a multi-process run: a shared flock on RUN/.lock (so a lone harvest, or `harvest
    verify --repair`, cannot run beside it) and an exclusive one on RUN/.lock.pN (so two processes
    never share an index). A crashed process releases its flocks. Object stores have no flock: a lease
    object RUN/leases/pN.json (harvest.store.lease). Raises StoreError, in one line, when another live
    process holds what this one needs, so two harvests never write, or clean up, the same shards.
    """
    layout = StoreLayout(run_dir)
    if layout.remote:
        from harvest.store.lease import Lease

        return Lease(layout, share).acquire()
    layout.root.mkdir(parents=True, exist_ok=True)
    if share.count == 1:
        return _flock(layout, layout.lock_file, exclusive=True)
    shared = _flock(layout, layout.lock_file, exclusive=False)
    try:
        own = _flock(layout, layout.process_lock_file(share.index), exclusive=True)
    except BaseException:
        shared.close()
        raise
    return _Locks([own, shared])


def _flock(layout: StoreLayout, path: Path, exclusive: bool):
    import fcntl

    f = open(path, "a+")
    try:
        fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise StoreError(f"{layout.root} is in use by another harvest process") from None
    if exclusive:  # who holds it, for a person looking at the folder; flock itself is what counts
        f.seek(0), f.truncate(), f.write(f"{os.getpid()}\n"), f.flush()
    return f


class _Locks:
    """Several flocks held and released together."""

    def __init__(self, files: list):
        self.files = files

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_commits(run_dir) -> dict[int, dict]:
    """Committed shard index -> commit record, every process's. Ignores tmp files; raises if a record is
    unreadable. Listing commits/ is the first thing a reader does: a shard exists once its record does."""
    layout = StoreLayout(run_dir)
    files = layout.files
    paths = {}
    for p, is_dir in files.entries(layout.commits_dir):
        i = StoreLayout.commit_index(p.name)
        if i is not None and not is_dir:
            paths[i] = p
    out = {}
    for (i, p), data in zip(paths.items(), files.read_many(list(paths.values()))):
        fix = f"run `harvest verify --repair {layout.root}` to re-harvest shard {i}"
        out[i] = parse_json(data, p, "commit record", fix)
        if not isinstance(out[i], dict) or not {"num_tokens", "sequence_ids", "hooks"} <= out[i].keys():
            raise StoreError(f"{p}: commit record lacks its fields; run `harvest verify --repair {layout.root}`")
    return dict(sorted(out.items()))


def find_leftovers(layout: StoreLayout, committed: set[int], share: ProcessShare | None = None) -> list[Path | URL]:
    """What a crash leaves behind: temp shard dirs (`*.zarr.tmp-*`), temp commit and run.json files (`*.tmp-*`),
    `*.partial` files that zarr's local store can leave, and shard dirs without a commit record.

    share: only the leftovers that process owns (its shard indices; root-level temp files belong to
    process 0), so it never removes a shard another live process is writing. None: every process's."""
    files = layout.files

    def mine(index: int | None) -> bool:
        return share is None or (index is not None and share.owns(index))

    out: list = []
    # run.json / summary.json written half-way (tmp file + rename)
    out += [p for p, is_dir in files.entries(layout.root) if TMP_MARK in p.name and not is_dir and mine(0)]
    out += [p for p, _ in files.entries(layout.commits_dir) if TMP_MARK in p.name and mine(layout.owner_index(p.name))]
    shards = files.entries(layout.shards_dir)
    for p, _ in shards:
        i = StoreLayout.shard_index(p.name)
        if (TMP_MARK in p.name or (i is not None and i not in committed)) and mine(layout.owner_index(p.name)):
            out.append(p)
    if shards:
        inside = set(out)
        for p in files.partials(layout.shards_dir):
            shard = p.relative_to(layout.shards_dir).parts[0]
            if not inside & set(p.parents) and mine(layout.owner_index(shard)):
                out.append(p)
    return out


def scan_run(run_dir, clean: bool = True, share: ProcessShare = LONE) -> ScanResult:
    """For resume: delete this process's crash leftovers (find_leftovers), return what is committed
    (by every process) and the first shard index this process owns above every committed one. Other
    files are left alone. Call it with the run's lock held for `share` (lock_run)."""
    layout = StoreLayout(run_dir)
    files = layout.files
    commits = read_commits(run_dir)
    removed = [str(p.relative_to(layout.root)) for p in find_leftovers(layout, set(commits), share)]
    if clean:
        for rel in removed:
            files.remove(layout.root / rel)
    present = {p.name for p, is_dir in files.entries(layout.shards_dir) if is_dir}
    seen: set[int] = set()
    for i, rec in commits.items():
        if layout.shard_path(i).name not in present:
            raise StoreError(
                f"{layout.commit_path(i)} exists but its shard {layout.shard_path(i)} is missing; "
                f"run `harvest verify --repair {layout.root}`, then the harvest again to regenerate it"
            )
        ids = set(rec["sequence_ids"])
        if ids & seen:
            raise StoreError(f"shard {i} repeats sequence ids already committed: {sorted(ids & seen)[:5]}")
        seen |= ids
    return ScanResult(
        seen,
        share.first_after(max(commits, default=-1)),
        list(commits),
        sum(r["num_tokens"] for r in commits.values()),
        removed,
    )
