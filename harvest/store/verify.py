"""Checking a run folder end to end (`harvest verify`), moving damage aside (`--repair`), and
describing a run (`harvest info`).

verify_run compares every commit record with its shard's files (present, sizes, whole-file crc32c),
reports orphan shards, crash leftovers and a run.json that disagrees with the shards, and with
deep=True decodes every chunk of every array (each chunk's own crc32c included) and checks the
shapes and sequence ids against the commit record. Format version 3 adds a check of the sequence
tables: every sequence that shares a prompt prefix names a committed, earlier donor whose prompt is
long enough (deep: and the stored prompt rows of every sequence in a chain start where its table
says). repair_run moves each damaged shard and its
commit record into RUN/quarantine/<time>/ (commit record first, so a crash mid-repair never leaves
a visible damaged shard), then removes leftovers as a resume would: re-running the harvest then
regenerates exactly the sequences of the quarantined shards.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from harvest.store.format import FORMAT_VERSION, PHASES, StoreLayout
from harvest.store.integrity import check_files
from harvest.store.location import URL
from harvest.store.reader import data_file
from harvest.store.runfolder import (
    StoreError,
    check_run_folder,
    find_leftovers,
    lock_run,
    parse_json,
    read_commits,
    read_run_metadata,
    scan_run,
)

__all__ = ["Finding", "VerifyReport", "verify_run", "repair_run", "run_info"]

# Findings that make a shard untrustworthy: repair quarantines the shard and re-harvests it.
SHARD_DAMAGE = ("damaged", "commit", "duplicate")
# Findings that moving files cannot fix: --repair leaves them, and `harvest verify` prints what to do.
NOT_REPAIRABLE = {
    "run.json": "run.json cannot be repaired from the shards: restore it from a copy",
    "unfinished": "the run is unfinished: run the same harvest command again to commit the missing sequences",
    "shared-prompt": "shared prompts that disagree with their donors were written so (the shards match their "
    "checksums): --repair leaves them, and reading those sequences raises StoreError",
}
_READS = 16  # concurrent sequence-table reads on an object store


@dataclasses.dataclass(frozen=True)
class Finding:
    kind: (
        str  # "damaged" | "commit" | "duplicate" | "orphan" | "leftover" | "run.json" | "unfinished" | "shared-prompt"
    )
    path: str  # relative to the run folder
    detail: str
    shard: int | None = None

    def line(self) -> str:
        return f"{self.kind}: {self.path}: {self.detail}"


@dataclasses.dataclass
class VerifyReport:
    root: Path | URL
    deep: bool
    shards: int = 0  # commit records read
    files: int = 0  # files checked against a manifest
    bytes: int = 0  # bytes checksummed
    legacy_shards: int = 0  # format version 1: no manifest, existence (and, deep, decoding) only
    findings: list[Finding] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def damaged_shards(self) -> list[int]:
        return sorted({f.shard for f in self.findings if f.kind in SHARD_DAMAGE and f.shard is not None})

    def unrepairable(self) -> list[str]:
        """What --repair leaves: one line of advice per kind of such finding (NOT_REPAIRABLE)."""
        kinds = {f.kind for f in self.findings}
        return [advice for kind, advice in NOT_REPAIRABLE.items() if kind in kinds]


def _commit_records(layout: StoreLayout, report: VerifyReport) -> dict[int, dict]:
    out = {}
    files = layout.files
    paths = [(StoreLayout.commit_index(p.name), p) for p, _ in files.entries(layout.commits_dir)]
    paths = [(i, p) for i, p in paths if i is not None]
    for (i, p), data in zip(paths, files.read_many([p for _, p in paths])):
        report.shards += 1
        try:
            rec = parse_json(data, p, "commit record", "")
            if not isinstance(rec, dict) or not {"num_tokens", "sequence_ids", "hooks", "path"} <= rec.keys():
                raise StoreError("the commit record lacks its fields")
        except StoreError as e:
            report.findings.append(Finding("commit", _rel(layout, p), str(e).split(": ", 1)[-1].rstrip("; "), i))
            continue
        out[i] = rec
    return out


def _rel(layout: StoreLayout, p: Path | URL) -> str:
    return p.relative_to(layout.root).as_posix()


def _check_run_json(layout: StoreLayout, commits: dict[int, dict], report: VerifyReport) -> None:
    if not layout.files.is_file(layout.run_json):
        if commits:
            report.findings.append(Finding("run.json", "run.json", "missing: the run's config and provenance are lost"))
        return
    try:
        meta = read_run_metadata(layout.root)
    except StoreError as e:
        report.findings.append(Finding("run.json", "run.json", str(e).split(": ", 1)[-1]))
        return
    hooks = meta.get("hooks")
    for i, rec in commits.items():
        if hooks is not None and rec["hooks"] != hooks:
            report.findings.append(
                Finding("run.json", "run.json", f"hooks {sorted(hooks)} differ from shard {i}'s {sorted(rec['hooks'])}")
            )
            return


def _check_shard(layout: StoreLayout, i: int, rec: dict, report: VerifyReport, fetched: dict | None = None) -> bool:
    """Files against the manifest; True if the shard may be decoded. fetched (object stores) receives
    the bytes of the files that matched, so a deep check decodes them without downloading them again."""
    shard = layout.root / rec["path"]
    name = _rel(layout, shard)
    if rec.get("format_version", 1) > FORMAT_VERSION:
        report.findings.append(
            Finding("commit", name, f"format version {rec['format_version']} is newer than this harvest", i)
        )
        return False
    if not layout.files.is_dir(shard):
        report.findings.append(Finding("damaged", name, "the shard folder is missing", i))
        return False
    files = rec.get("files")
    if files is None:
        report.legacy_shards += 1
        return True
    problems = check_files(shard, files, checksum=lambda rel: True, unlisted=True, fetched=fetched)
    report.files += len(files)
    report.bytes += sum(size for size, _ in files.values())
    for p in problems:
        report.findings.append(Finding("damaged", f"{name}/{p.path}", p.detail, i))
    return not problems


def _decode_shard(layout: StoreLayout, i: int, rec: dict, report: VerifyReport, fetched: dict | None = None) -> None:
    """Decode every chunk of every array; check lengths, widths and sequence ids against the record."""
    shard = layout.root / rec["path"]
    name = _rel(layout, shard)
    n, sids = rec["num_tokens"], rec["sequence_ids"]

    def bad(file: str, detail: str) -> None:
        report.findings.append(Finding("damaged", f"{name}/{file}", detail, i))

    try:
        group = zarr.open_group(layout.files.zarr_store(shard, prefetched=fetched), mode="r")
    except Exception as e:
        return bad("zarr.json", f"cannot open: {type(e).__name__}: {e}")
    arrays = [(a, arr) for a, arr in group.arrays()]
    arrays += [(f"sequences/{a}", arr) for a, arr in group["sequences"].arrays()] if "sequences" in group else []
    want_hooks = rec["hooks"]
    acts = group["acts"] if "acts" in group else None
    arrays += [(f"acts/{h}", acts[h]) for h in want_hooks if acts is not None and h in acts]
    missing = [h for h in want_hooks if acts is None or h not in acts]
    for h in missing:
        bad(f"acts/{h}", "the hook's array is missing")
    for a, arr in arrays:
        try:
            if a.startswith("acts/"):
                if arr.shape != (n, want_hooks[a[5:]]):
                    bad(a, f"shape {arr.shape}, the commit record says ({n}, {want_hooks[a[5:]]})")
                    continue
                step = arr.chunks[0]
                for start in range(0, n, step):
                    arr[start : start + step]
            else:
                values = arr[...]
                want = len(sids) if a.startswith("sequences/") else n
                if len(values) != want:
                    bad(data_file(a), f"{len(values)} rows, the commit record says {want}")
                elif a == "sequences/sequence_id" and [int(v) for v in values] != list(sids):
                    bad(data_file(a), "sequence ids differ from the commit record")
        except Exception as e:
            bad(data_file(a), f"cannot decode: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")


_SHARING_COLUMNS = (
    "sequence_id",
    "prompt_sequence_id",
    "shared_prompt_length",
    "prompt_length",
    "token_offset",
    "token_count",
)


def _read_sharing(layout: StoreLayout, rec: dict) -> dict[str, np.ndarray] | Exception:
    """The columns of a shard's sequence table that shared prompts need (those it has), or the error."""
    try:
        group = zarr.open_group(layout.files.zarr_store(layout.root / rec["path"]), mode="r")
        table = group["sequences"]
        return {n: np.asarray(table[n][...]) for n in _SHARING_COLUMNS if n in table}
    except Exception as e:
        return e


def _check_shared_prompts(
    layout: StoreLayout, commits: dict[int, dict], healthy: set[int], report: VerifyReport, deep: bool
) -> None:
    """Format version 3: each sequence with shared_prompt_length P > 0 names a committed donor with a
    smaller id, and P fits both prompts; deep: every sequence of a chain stores its prompt rows from
    its own shared length on. Damaged shards are skipped (already reported)."""
    tables: dict[int, dict[str, np.ndarray]] = {}

    def read(shards: list[int]) -> None:
        with ThreadPoolExecutor(_READS if layout.remote else 1) as pool:
            for i, t in zip(shards, pool.map(lambda i: _read_sharing(layout, commits[i]), shards)):
                if isinstance(t, Exception):
                    detail = f"cannot read: {type(t).__name__}: {(str(t).splitlines() or [''])[0]}"
                    report.findings.append(Finding("damaged", f"{commits[i]['path']}/sequences", detail, i))
                elif {"sequence_id", "token_offset", "token_count"} <= t.keys():
                    tables[i] = t

    read(sorted(i for i in healthy if commits[i].get("format_version", 1) >= 3))  # older ones share nothing
    followers = [
        (i, j)
        for i, t in tables.items()
        if "shared_prompt_length" in t
        for j in np.flatnonzero(t["shared_prompt_length"] > 0)
    ]

    def value(i: int, j: int, name: str) -> int:  # -1 where a shard lacks the column
        return int(tables[i][name][j]) if name in tables[i] else -1

    shard_of = {sid: i for i, rec in commits.items() for sid in rec["sequence_ids"]}  # every committed sequence
    donors = {value(i, j, "prompt_sequence_id") for i, j in followers}
    read(sorted({shard_of[d] for d in donors if shard_of.get(d) in healthy} - tables.keys()))  # a resumed v2 run
    where = {int(sid): (i, j) for i, t in tables.items() for j, sid in enumerate(t["sequence_id"])}
    missing: dict[int, list[str]] = {}  # follower shard -> what it misses
    for i, j in followers:
        sid, shared, donor = (value(i, j, c) for c in ("sequence_id", "shared_prompt_length", "prompt_sequence_id"))
        prompt, shares = value(i, j, "prompt_length"), f"sequence {sid} shares its first {shared} prompt rows"
        if not 0 <= donor < sid:
            problem = f"{shares} with sequence {donor}: a donor is an earlier sequence"
        elif shared > prompt:
            problem = f"{shares}, but its prompt has {prompt}"
        elif donor not in shard_of:
            missing.setdefault(i, []).append(f"{shares} with sequence {donor}, which is not committed")
            continue
        elif donor in where and shared > value(*where[donor], "prompt_length"):
            problem = f"{shares} with sequence {donor}, whose prompt has {value(*where[donor], 'prompt_length')}"
        else:
            continue
        report.findings.append(Finding("shared-prompt", f"{commits[i]['path']}/sequences", problem, i))
    for i, lines in missing.items():
        more = f" (and {len(lines) - 1} more of its sequences)" if len(lines) > 1 else ""
        detail = f"{lines[0]}{more}: the run is unfinished; run the same harvest command again"
        report.findings.append(Finding("unfinished", commits[i]["path"], detail, i))
    if deep:
        chains = {(i, int(j)) for i, j in followers} | {where[d] for d in donors if d in where}
        _check_prompt_rows(layout, commits, tables, chains, report)


def _check_prompt_rows(
    layout: StoreLayout, commits: dict[int, dict], tables: dict, chains: set[tuple[int, int]], report: VerifyReport
) -> None:
    """Each (shard, table row) of a sharing chain stores prompt positions [shared, prompt_length) first:
    exactly the rows a reader takes from it."""
    for i in sorted({i for i, _ in chains}):
        t, name = tables[i], commits[i]["path"]
        try:
            group = zarr.open_group(layout.files.zarr_store(layout.root / name), mode="r")
            position = group["position"][...]  # [n]
        except Exception as e:
            detail = f"cannot decode: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            report.findings.append(Finding("damaged", f"{name}/{data_file('position')}", detail, i))
            continue
        for j in sorted(j for k, j in chains if k == i):
            prompt = int(t["prompt_length"][j]) if "prompt_length" in t else -1
            start = max(int(t["shared_prompt_length"][j]) if "shared_prompt_length" in t else 0, 0)
            if prompt < start:
                continue  # the table check reported it
            offset, count = int(t["token_offset"][j]), int(t["token_count"][j])
            rows = position[offset : offset + min(count, max(prompt - start, 1))]  # its prompt rows (or first row)
            if count >= prompt - start and np.array_equal(rows, np.arange(start, start + len(rows))):
                continue
            want = f"its prompt positions {start}..{prompt - 1}" if prompt > start else f"position {start}"
            found = f"its first stored row is position {int(rows[0])}" if len(rows) else "it stores no rows"
            detail = (
                f"sequence {int(t['sequence_id'][j])} shares {start} prompt rows, so it should store {want} first; "
                f"{found}, {count} rows in all"
            )
            report.findings.append(Finding("shared-prompt", f"{name}/{data_file('position')}", detail, i))


def verify_run(root, deep: bool = False, progress: Callable | None = None) -> VerifyReport:
    """Check a run folder; progress(iterable, total) may wrap the shard loop (e.g. tqdm)."""
    layout = StoreLayout(root)
    check_run_folder(layout)
    report = VerifyReport(layout.root, deep)
    commits = _commit_records(layout, report)
    _check_run_json(layout, commits, report)
    seen: dict[int, int] = {}
    items = list(commits.items())
    for i, rec in progress(items, len(items)) if progress else items:
        repeated = sorted(set(rec["sequence_ids"]) & seen.keys())
        if repeated:
            also = f"sequence ids {repeated[:5]} are also in shard {seen[repeated[0]]}"
            report.findings.append(Finding("duplicate", rec["path"], also, i))
            continue
        seen.update(dict.fromkeys(rec["sequence_ids"], i))
        fetched: dict | None = {} if deep else None  # one shard's files at a time
        if _check_shard(layout, i, rec, report, fetched) and deep:
            _decode_shard(layout, i, rec, report, fetched)
    healthy = set(commits) - {f.shard for f in report.findings}
    _check_shared_prompts(layout, commits, healthy, report, deep)
    for p in find_leftovers(layout, set(commits) | {f.shard for f in report.findings if f.kind == "commit"}):
        kind = "orphan" if StoreLayout.shard_index(p.name) is not None else "leftover"
        detail = "shard without a commit record" if kind == "orphan" else "temporary file of an interrupted write"
        report.findings.append(Finding(kind, _rel(layout, p), detail))
    return report


def repair_run(report: VerifyReport) -> list[str]:
    """Quarantine the damaged shards of a verify report, then remove leftovers. -> what was done.

    Holds the run's lock, so it never races a live harvest. run.json findings are not repairable
    here (the run's config cannot be rebuilt from its shards): they stay in the report."""
    layout = StoreLayout(report.root)
    files = layout.files
    done = []
    with lock_run(layout.root):  # as a lone harvest: refused while any harvest process holds the run
        bad = report.damaged_shards()
        if bad:
            stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
            dest = layout.quarantine_dir / stamp
            files.mkdir(dest)
            for i in bad:
                for p in (layout.commit_path(i), layout.shard_path(i)):  # the commit record first
                    if files.exists(p):
                        files.move(p, dest / p.name)
                        done.append(f"moved {_rel(layout, p)} to {_rel(layout, dest / p.name)}")
        done += [f"removed {rel}" for rel in scan_run(layout.root).removed]
    return done


def run_info(root) -> dict:
    """What a run holds, from its commit records and run.json (no activation is read)."""
    layout = StoreLayout(root)
    files = layout.files
    check_run_folder(layout)
    commits = read_commits(layout.root)
    meta = read_run_metadata(layout.root) if files.is_file(layout.run_json) else {}
    recs = list(commits.values())
    phases = {p: sum(r.get("tokens_per_phase", {}).get(p, 0) for r in recs) for p in PHASES}
    acts_bytes = sum(r.get("acts_bytes", 0) for r in recs)
    raw = sum(r.get("acts_raw_bytes", 0) for r in recs)
    leftovers = [_rel(layout, p) for p in find_leftovers(layout, set(commits))]
    quarantined = sorted(_rel(layout, p) for d, _ in files.entries(layout.quarantine_dir) for p, _ in files.entries(d))
    return {
        "root": str(layout.root),
        "format_versions": sorted({r.get("format_version", 1) for r in recs}),
        "shards": len(recs),
        "sequences": sum(r["num_sequences"] for r in recs),
        "tokens": sum(r["num_tokens"] for r in recs),
        "tokens_per_phase": phases,
        "hooks": recs[0]["hooks"] if recs else meta.get("hooks", {}),
        "storage_dtype": recs[0]["storage_dtype"] if recs else None,
        "codec": recs[0]["codec"] if recs else None,
        "bytes_on_disk": sum(r.get("bytes", 0) for r in recs),
        "acts_bytes": acts_bytes,
        "compression_ratio": raw / acts_bytes if acts_bytes else float("nan"),
        "model": meta.get("model", {}).get("source"),
        "dataset": {k: meta.get("dataset", {}).get(k) for k in ("source", "split")},
        "sessions": meta.get("sessions", []),
        "leftovers": leftovers,
        "quarantined": quarantined,
        "finished": meta.get("finished"),
    }
