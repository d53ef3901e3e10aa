"""How much do runtime settings change fp32 activations? (docs/FORMAT.md, "Runtime settings and bits")

    python bench/runtime_invariance.py [--model FOLDER|random:tiny] [--tasks 6] [--new 48] [--hooks H ...]

runtime.* keys may change between sessions of one run, because they schedule the work: which rows
share a prefill call or a decode step, how prompts are cut into chunks. The math per row is the
same, but XLA may sum in another order for another batch shape, so the last bits of float32 can move.
This runs the same harvest twice, once with the defaults and once with everything else changed
(batch 1, 2 decode slots, prefill chunks of 64, no tail pool), and prints, per hook:
  - the share of values that are bit-identical;
  - the largest difference relative to each token's own activation norm;
  - how many sequences' greedy tokens differ.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from harvest.cli.config import from_dict
from harvest.data import open_store
from harvest.run import run

DEFAULT = os.path.expanduser("~/.cache/harvest-fixtures/qwen2.5-coder-0.5b-instruct")
OTHER = {"batch_size": 1, "decode_slots": 2, "prefill_chunk": 64, "tail_slots": 0}


def harvest(model: str, out: Path, tasks: int, new: int, hooks: list[str], runtime: dict) -> None:
    raw = {
        "model": {"path": model, "dtype": "float32"},
        "data": {"limit": tasks, "max_prompt_tokens": 2048},
        "generation": {"max_new_tokens": new},
        "capture": {"hooks": hooks, "dtype": "float32", "phases": ["prefill", "decode"]},
        "runtime": {"progress": False, **runtime},
        "output": {"path": str(out)},
    }
    run(from_dict(raw), overwrite=True)


def compare(a, b) -> None:
    ids = sorted(int(s) for s in a.sequences["sequence_id"])
    assert ids == sorted(int(s) for s in b.sequences["sequence_id"])
    token_diff = 0
    same = {h: [0, 0] for h in a.hooks}  # bit-identical values, all values
    worst = dict.fromkeys(a.hooks, 0.0)
    for sid in ids:
        x, y = a.sequence(sid), b.sequence(sid)
        if not np.array_equal(x["token_id"], y["token_id"]):
            token_diff += 1
        n = min(len(x["token_id"]), len(y["token_id"]))
        # up to the first differing token: after it the two runs see different inputs
        k = next((i for i in range(n) if x["token_id"][i] != y["token_id"][i]), n)
        for h in a.hooks:
            u, v = np.asarray(x[h][:k], np.float64), np.asarray(y[h][:k], np.float64)  # [k, d]
            same[h][0] += int((x[h][:k] == y[h][:k]).sum())
            same[h][1] += u.size
            norm = np.linalg.norm(u, axis=1, keepdims=True) + 1e-30
            worst[h] = max(worst[h], float((np.abs(u - v) / norm).max(initial=0.0)))
    print(f"{len(ids)} sequences, {a.num_tokens:,} tokens; greedy tokens differ in {token_diff}")
    print(f"{'hook':32s} {'bit-identical':>14s} {'max |diff| / |x|':>18s}")
    for h in a.hooks:
        print(f"{h:32s} {same[h][0] / max(same[h][1], 1):14.4%} {worst[h]:18.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT if os.path.isdir(DEFAULT) else "random:tiny")
    ap.add_argument("--tasks", type=int, default=6)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--hooks", nargs="+", default=["blocks.*.hook_resid_post"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base, other = Path(tmp) / "defaults", Path(tmp) / "other"
        harvest(args.model, base, args.tasks, args.new, args.hooks, {})
        harvest(args.model, other, args.tasks, args.new, args.hooks, OTHER)
        print(f"model {args.model}; runtime defaults vs {OTHER}")
        compare(open_store(base), open_store(other))


if __name__ == "__main__":
    main()
