"""Two harvest processes on localhost (jax.distributed, 4 fake CPU devices each, runtime.mesh data=4)
write one run folder. Process 1 is killed mid-run (process 0 with it, as a cluster manager would), the
same command is run again on both, and their union equals a one-process, one-device run: nothing lost
or duplicated. Processes that disagree (config, or a folder they do not share) all stop with one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from harvest.cli.distributed import take_share
from harvest.cli.main import main
from harvest.data import open_store
from harvest.store.format import ProcessShare
from helpers.runs import ROOT, run_config

OVERRIDES = dict(
    data__limit=6,
    capture__shard_mb=0.001,  # a shard per sequence: many commit points, indices of both processes interleave
    capture__hooks=["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post"],
    runtime__batch_size=4,
    runtime__decode_slots=8,
)
ENV = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


@pytest.fixture(scope="module")
def setup(real_vocab_model, tmp_path_factory):
    """(model folder, compile cache, the one-process one-device run)."""
    _, folder = real_vocab_model
    base = tmp_path_factory.mktemp("distributed")
    cache = base / "xla-cache"
    cfg = base / "single.yaml"
    cfg.write_text(yaml.safe_dump(run_config(folder, base / "single", **OVERRIDES)))
    assert main(["run", str(cfg)]) == 0
    return folder, cache, open_store(base / "single")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_pair(
    setup, out, tmp_path, failpoint: dict[int, str] | None = None, p1: dict | None = None
) -> list[subprocess.Popen]:
    """Processes 0 and 1 of one run; p1: config overrides (section__key) for process 1 alone."""
    folder, cache, _ = setup
    port = free_port()
    procs = []
    for pid in (0, 1):
        dist = {"coordinator_address": f"localhost:{port}", "num_processes": 2, "process_id": pid}
        raw = run_config(
            folder,
            out,
            runtime__distributed=dist,
            runtime__mesh={"data": 4},
            runtime__compile_cache=str(cache),
            **{**OVERRIDES, **((p1 or {}) if pid == 1 else {})},
        )
        cfg = tmp_path / f"p{pid}.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        env = {**os.environ, **ENV}
        if failpoint and pid in failpoint:
            env["HARVEST_FAILPOINT"] = failpoint[pid]
        log = open(tmp_path / f"p{pid}.log", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "harvest.cli.main", "run", str(cfg)], cwd=ROOT, env=env, stdout=log, stderr=log
            )
        )
    return procs


def wait_all(procs, tmp_path, timeout=400) -> list[int]:
    deadline = time.time() + timeout
    for p in procs:
        p.wait(timeout=max(1, deadline - time.time()))
    return [p.returncode for p in procs]


def assert_union_equals(store, single) -> None:
    ids = list(store.sequences["sequence_id"])
    assert len(ids) == len(set(ids)) == single.num_sequences  # nothing lost, nothing twice
    assert store.num_tokens == single.num_tokens
    for sid in single.sequences["sequence_id"]:
        got, want = store.sequence(int(sid)), single.sequence(int(sid))
        assert got.keys() == want.keys()
        for k in want:
            if np.issubdtype(want[k].dtype, np.floating):  # another device count: other float summation orders
                scale = max(float(np.abs(want[k]).max()), 1e-12)
                assert float(np.abs(got[k] - want[k]).max()) / scale < 1e-5, (sid, k)
            else:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"sequence {sid}: {k}")


def shard_owners(store) -> set[int]:
    return {s.index % 2 for s in store.shards}


def test_a_killed_process_is_resumed_by_rerunning_both(setup, tmp_path, capsys):
    out = tmp_path / "run"
    procs = start_pair(setup, out, tmp_path, failpoint={1: "pipeline.sequence@2:kill"})
    procs[1].wait(timeout=400)
    assert procs[1].returncode == -signal.SIGKILL, (tmp_path / "p1.log").read_text()[-2000:]
    procs[0].kill()  # what a cluster manager does to the rest of a failed job
    procs[0].wait()
    before = open_store(out).num_sequences if (out / "commits").is_dir() else 0
    assert before < setup[2].num_sequences
    codes = wait_all(start_pair(setup, out, tmp_path), tmp_path)
    assert codes == [0, 0], [(tmp_path / f"p{i}.log").read_text()[-2000:] for i in (0, 1)]
    store = open_store(out)
    assert shard_owners(store) == {0, 1}  # both processes committed shards, under names they own
    assert_union_equals(store, setup[2])  # the union equals the one-process, one-device run
    assert main(["verify", str(out), "--deep"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sequences"] == setup[2].num_sequences and len(summary["session"]["processes"]) == 2
    assert main(["info", str(out)]) == 0
    assert " with 2 processes, harvest " in capsys.readouterr().out


@pytest.mark.parametrize(
    "p1, message",
    [
        (
            {"generation__max_new_tokens": 5},
            "process 1 of 2 differs from process 0 in config; give every process the same config, model, task "
            "files and --overwrite",
        ),
        (
            {"output__path": "elsewhere"},  # as if each host had its own disk
            "process 1 of 2 differs from process 0 in the run.json it sees; output.path {out} is not one folder "
            "shared by every host; use a shared file system or an s3:// URL",
        ),
    ],
)
def test_processes_that_disagree_all_stop_with_one_line(setup, tmp_path, p1, message):
    out = tmp_path / "run"
    outs = [out, tmp_path / p1["output__path"] if "output__path" in p1 else out]
    procs = start_pair(
        setup, out, tmp_path, p1={**p1, **({"output__path": str(outs[1])} if "output__path" in p1 else {})}
    )
    assert wait_all(procs, tmp_path) == [2, 2]
    for i in (0, 1):  # each names its own output.path
        errors = [x for x in (tmp_path / f"p{i}.log").read_text().splitlines() if x.startswith("harvest: ")]
        assert errors == [f"harvest: error: {message.format(out=outs[i])}"], errors
    assert not (out / "commits").is_dir() or not any((out / "commits").iterdir())  # nothing harvested


def test_shares_are_disjoint_balanced_and_fixed():
    rng = np.random.default_rng(0)
    costs = {i: int(c) for i, c in enumerate(rng.integers(100, 2000, 101))}
    for n in (1, 2, 3, 8):
        shares = [take_share(costs, ProcessShare(i, n)) for i in range(n)]
        assert set().union(*shares) == set(costs) and sum(map(len, shares)) == len(costs)
        loads = [sum(costs[s] for s in share) for share in shares]
        assert max(loads) - min(loads) <= max(costs.values())  # within one sequence's cost
        assert shares == [take_share(dict(reversed(costs.items())), ProcessShare(i, n)) for i in range(n)]
