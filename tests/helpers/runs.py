"""Whole harvest runs for the CLI tests: a config over a few short real ARC tasks, a subprocess
runner, and the comparison of two run folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
# Short ARC-AGI-1 evaluation tasks (112-220 prompt tokens), to keep the suite fast.
SHORT_TASKS = ["66e6c45b", "00576224", "be03b35f", "e633a9e5", "4cd1b7b2", "ca8de6ea", "6ea4a07e", "60c09cac"]
HOOKS = [
    "blocks.0.hook_resid_pre",
    "blocks.1.hook_attn_out",
    "blocks.1.hook_resid_mid",
    "blocks.0.mlp.hook_post",
    "blocks.2.hook_mlp_out",
    "blocks.1.hook_resid_post",
]


def run_config(folder, out, **over) -> dict:
    """A raw config dict; over: section__key=value."""
    raw = {
        "model": {"path": str(folder), "dtype": "float32"},
        "data": {"source": "arc-agi-1", "split": "evaluation", "tasks": SHORT_TASKS, "limit": 3, "shuffle_seed": 1},
        "generation": {"max_new_tokens": 6, "fixed_length": True},
        "capture": {"hooks": HOOKS, "phases": ["prefill", "decode"], "dtype": "float32", "shard_mb": 1},
        "runtime": {"batch_size": 2, "progress": False, "compile_cache": None},
        "output": {"path": str(out)},
    }
    for key, value in over.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return raw


def harvest_process(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m harvest.cli.main ARGS` in a fresh process; stdout and stderr together."""
    return subprocess.run(
        [sys.executable, "-m", "harvest.cli.main", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def assert_same_run(a, b) -> None:
    """Two stores hold the same sequences with bit-identical tokens and activations."""
    assert a.num_sequences == b.num_sequences and a.num_tokens == b.num_tokens
    assert sorted(a.sequences["sequence_id"]) == sorted(b.sequences["sequence_id"])
    for sid in b.sequences["sequence_id"]:
        x, y = a.sequence(int(sid)), b.sequence(int(sid))
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"sequence {sid}: {k}")


def notebook_store(out) -> None:
    """The small real store the notebooks run against: random:tiny over 3 short tasks, 8 forced new tokens,
    blocks.1.hook_resid_post and blocks.2.mlp.hook_post in bfloat16."""
    from harvest.cli.config import from_dict
    from harvest.run import run

    run(
        from_dict(
            {
                "model": {"path": "random:tiny", "dtype": "float32"},
                "data": {
                    "source": "arc-agi-1",
                    "split": "evaluation",
                    "tasks": SHORT_TASKS[:3],
                    "limit": 3,
                    "shuffle_seed": 1,
                },  # fmt: skip
                "generation": {"max_new_tokens": 8, "fixed_length": True},
                "capture": {
                    "hooks": ["blocks.1.hook_resid_post", "blocks.2.mlp.hook_post"],
                    "phases": ["prefill", "decode"],
                    "dtype": "bfloat16",
                    "shard_mb": 1,
                },
                "runtime": {"batch_size": 3, "progress": False, "compile_cache": None},
                "output": {"path": str(out)},
            }
        )
    )
