"""Answer parsing and scoring.

parse_grid reads rows from generated text: it skips leading lines that don't start with a digit
(a chat model's "Output:" or "```"), then reads rows until a blank line, a line that doesn't start
with a digit ("Input", a fence) or the end. A grid must be rectangular, 1..30 per side, digits 0..9.

Scoring follows the ARC Prize rule: a test output counts if one of 2 attempts matches exactly; a
task scores the fraction of its tests solved; the dataset score is the mean over tasks. The two
attempts are the two most frequent distinct parsed predictions, ties broken by best log-likelihood
and then by first appearance.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

import numpy as np

from harvest.arc.tasks import MAX_SIDE

_LABEL = re.compile(r"\s*\d{1,2}\s*[:|]\s*")  # "12: " row label of the numbered format


# ------------------------------------------------------------------------------------- parsing


def _row_cells(line: str, start: int, fmt: str):
    """One text line -> list of (char position, value), or a reason string."""
    body = line.rstrip()
    i = len(body) - len(body.lstrip())
    if fmt == "numbered":
        m = _LABEL.match(body)
        if m and m.end() < len(body):
            i = m.end()
    cells = []
    for j in range(i, len(body)):
        ch = body[j]
        if ch.isdigit() and ch.isascii():
            # spaced: digits must alternate with spaces, so "10" is one bad value, not two cells
            if fmt == "spaced" and cells and cells[-1][0] == start + j - 1:
                return f"value {body[j - 1]}{ch} is not a single digit"
            cells.append((start + j, int(ch)))
        elif ch == " " and fmt == "spaced":
            continue
        else:
            return f"unexpected character {ch!r}"
    return cells


@dataclasses.dataclass(frozen=True)
class ParsedAnswer:
    """A generated text read as a grid; on failure grid is None and reason says why."""

    grid: np.ndarray | None  # uint8 [h, w]
    reason: str
    cell_chars: np.ndarray | None = None  # [h*w] character position of each cell, row-major
    rows: np.ndarray | None = None  # [h*w] the cell's row
    cols: np.ndarray | None = None  # [h*w] the cell's column


def parse_answer(text: str, fmt: str = "digits") -> ParsedAnswer:
    """Generated text -> the grid it holds, with where each cell sits in the text."""
    cut = text.find("<|")  # leftover special tokens (decoded without skipping)
    if cut >= 0:
        text = text[:cut]
    rows, pos = [], 0
    for line in text.split("\n"):
        start, pos = pos, pos + len(line) + 1
        head = line.lstrip()[:1]
        if not (head.isdigit() and head.isascii()):
            if rows or line.lstrip().startswith("Input"):
                break  # a blank line, "Input" or other text ends the grid
            continue  # preamble before the grid
        cells = _row_cells(line, start, fmt)
        if isinstance(cells, str):
            return ParsedAnswer(None, f"row {len(rows)}: {cells}")
        rows.append(cells)
    if not rows:
        return ParsedAnswer(None, "no grid found")
    widths = sorted({len(r) for r in rows})
    if len(widths) > 1:
        return ParsedAnswer(None, f"ragged rows: widths {widths}")
    h, w = len(rows), widths[0]
    if h > MAX_SIDE or w > MAX_SIDE:
        return ParsedAnswer(None, f"grid {h}x{w} exceeds {MAX_SIDE}x{MAX_SIDE}")
    grid = np.array([[v for _, v in r] for r in rows], np.uint8)
    where = np.array([[p for p, _ in r] for r in rows], np.int64).ravel()
    rr, cc = np.divmod(np.arange(h * w), w)
    return ParsedAnswer(grid, "", where, rr, cc)


def parse_grid(text: str, fmt: str = "digits") -> tuple[np.ndarray | None, str]:
    """Generated text -> (grid uint8 [h, w], "") or (None, reason)."""
    parsed = parse_answer(text, fmt)
    return parsed.grid, parsed.reason


# ------------------------------------------------------------------------------------- scoring


def _grid(g):
    return None if g is None else np.asarray(g)


def score_sequence(pred, target) -> dict:
    """One attempt (un-augmented prediction) against the original target. Fields that need the
    target are None when it's unknown."""
    pred, target = _grid(pred), _grid(target)
    parsed = pred is not None
    out = {"parsed_ok": parsed, "pred_shape": tuple(pred.shape) if parsed else (-1, -1)}
    if target is None:
        return out | {"shape_ok": None, "pixel_accuracy": None, "correct": None}
    shape_ok = parsed and pred.shape == target.shape
    pix = float((pred == target).mean()) if shape_ok else 0.0
    return out | {"shape_ok": bool(shape_ok), "pixel_accuracy": pix, "correct": bool(shape_ok and pix == 1.0)}


def vote(predictions, logprobs=None, k: int = 2) -> list[np.ndarray]:
    """Up to k distinct grids, most frequent first; ties by best log-likelihood, then first seen."""
    groups: dict[bytes, list] = {}
    for i, p in enumerate(predictions):
        if p is None:
            continue
        g = np.asarray(p, np.uint8)
        key = bytes(g.shape) + g.tobytes()
        lp = -np.inf if logprobs is None or logprobs[i] is None else float(logprobs[i])
        if key not in groups:
            groups[key] = [g, 0, -np.inf, i]
        groups[key][1] += 1
        groups[key][2] = max(groups[key][2], lp)
    ranked = sorted(groups.values(), key=lambda x: (-x[1], -x[2], x[3]))
    return [g for g, *_ in ranked[:k]]


def _mean(xs):
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def score_tasks(records, skipped=(), k: int = 2) -> dict:
    """Attempt records -> run summary.

    records: dicts with task_id, test_index, prediction (un-augmented grid or None), target, the
    score_sequence fields, optional logprob. Tests without a target are left out of the scores.
    """
    by_test = defaultdict(list)
    for r in records:
        by_test[(str(r["task_id"]), int(r["test_index"]))].append(r)
    tests, by_task = {}, defaultdict(list)
    for (tid, ti), rs in sorted(by_test.items()):
        target = next((_grid(r["target"]) for r in rs if r.get("target") is not None), None)
        if target is None:
            continue
        lps = [r.get("logprob") for r in rs]
        picks = vote([r.get("prediction") for r in rs], lps, k)
        solved = any(p.shape == target.shape and (p == target).all() for p in picks)
        top1 = bool(picks) and picks[0].shape == target.shape and bool((picks[0] == target).all())
        any_ok = any(bool(r.get("correct")) for r in rs)
        tests[f"{tid}/{ti}"] = {"attempts": len(rs), f"pass@{k}": solved, "pass@1": top1, "oracle": any_ok}
        by_task[tid].append((solved, top1, any_ok))
    task_scores = {t: sum(s for s, _, _ in v) / len(v) for t, v in by_task.items()}
    score = _mean(task_scores.values())
    return {
        "n_tasks": len(by_task),
        "n_tests": len(tests),
        "n_attempts": len(records),
        "arc_score": score,  # official: mean over tasks (None: no targets)
        f"pass@{k}": _mean(s for v in by_task.values() for s, _, _ in v),  # over test inputs
        "pass@1": _mean(t for v in by_task.values() for _, t, _ in v),
        "oracle": _mean(o for v in by_task.values() for _, _, o in v),  # any attempt correct
        "accuracy": _mean(r.get("correct") for r in records),  # per attempt
        "parse_rate": _mean(r.get("parsed_ok") for r in records),
        "shape_accuracy": _mean(r.get("shape_ok") for r in records),
        "pixel_accuracy": _mean(r.get("pixel_accuracy") for r in records),
        "n_skipped": len(skipped),
        "skipped": [{"task_id": s.task_id, "reason": s.reason} if hasattr(s, "task_id") else s for s in skipped],
        "tasks": task_scores,
        "tests": tests,
        "k": k,
    }


def format_summary(summary: dict) -> str:
    """A small printed table of the headline numbers."""
    k = summary.get("k", 2)

    def pct(x):
        return "   n/a" if x is None else f"{100 * x:5.1f}%"

    rows = [
        ("tasks / tests / attempts", f"{summary['n_tasks']} / {summary['n_tests']} / {summary['n_attempts']}"),
        ("ARC score (mean over tasks)", pct(summary["arc_score"])),
        (f"pass@{k} (test inputs)", pct(summary[f"pass@{k}"])),
        ("pass@1 (top vote)", pct(summary["pass@1"])),
        ("any attempt correct", pct(summary["oracle"])),
        ("attempt accuracy", pct(summary["accuracy"])),
        ("parse rate", pct(summary["parse_rate"])),
        ("shape accuracy", pct(summary["shape_accuracy"])),
        ("pixel accuracy", pct(summary["pixel_accuracy"])),
        ("skipped tasks", str(summary["n_skipped"])),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule])
