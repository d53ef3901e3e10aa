"""Metrics from the accumulated sums (host side, float64), and the metrics.jsonl log.

    fvu                 = sum |y - y^|^2 / sum |y - mean(y)|^2   fraction of variance unexplained
    variance_explained  = 1 - fvu                                 0 for predicting the mean, 1 for exact
    l0                  = active latents per token
    dead                = latents not active in the last train.dead_tokens training tokens

Each figure is given for all rows and separately for prompt tokens (phase prefill) and answer tokens
(phase decode). The mean in the FVU is the window's own (each phase's own for the per-phase figures).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from harvest.sae.state import Accum

__all__ = ["PHASE_NAMES", "figures", "MetricsLog"]

PHASE_NAMES = ("prefill", "decode")


def _fvu(err: float, var: float) -> float | None:
    return float(err / var) if var > 0 else None


def figures(acc: Accum, ref: np.ndarray) -> dict:
    """{tokens, fvu, variance_explained, l0, prefill: {...}, decode: {...}} of an Accum (None where undefined)."""
    a = {f: np.asarray(getattr(acc, f), np.float64) for f in ("n", "err", "dev", "dev_sq", "l0")}
    ref = np.asarray(ref, np.float64)  # [2, d_out]
    n = a["n"]  # [2]
    safe = np.maximum(n, 1)
    within = a["dev_sq"] - np.sum(a["dev"] ** 2, axis=-1) / safe  # [2] sum |y - mean_p|^2
    means = ref + a["dev"] / safe[:, None]  # [2, d_out]
    total = n.sum()
    out: dict = {"tokens": int(total)}
    if total:
        mean = (n[:, None] * means).sum(0) / total
        var = within.sum() + float((n * np.sum((means - mean) ** 2, axis=-1)).sum())  # within + between phases
        fvu = _fvu(a["err"].sum(), var)
        out |= {"fvu": fvu, "variance_explained": None if fvu is None else 1 - fvu, "l0": float(a["l0"].sum() / total)}
    for p, name in enumerate(PHASE_NAMES):
        part: dict = {"tokens": int(n[p])}
        if n[p]:
            fvu = _fvu(a["err"][p], within[p])
            part |= {"fvu": fvu, "variance_explained": None if fvu is None else 1 - fvu, "l0": float(a["l0"][p] / n[p])}
        out[name] = part
    return out


class MetricsLog:
    """OUT/metrics.jsonl, one JSON object per line, appended and flushed line by line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Drop the lines a killed run wrote past its last checkpoint (they are written again on resume)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if rec.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{x}\n" for x in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
