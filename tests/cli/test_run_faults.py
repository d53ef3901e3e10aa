"""The process fault table (docs/RELIABILITY.md): a harvest dies, is interrupted, runs out of disk or
meets another harvest at a named point (harvest.failpoints), and the same command run again must
leave a run folder bit-identical to a run that never failed.

Each row runs a real harvest in a fresh process with HARVEST_FAILPOINT set, checks the exact
outcome (killed by SIGKILL; exit 130 with the one-line "interrupted" message; exit 2 with one line),
then resumes in this process and compares every sequence with the reference run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from harvest.cli.main import main
from harvest.data import open_store
from helpers.runs import ROOT, assert_same_run, harvest_process, run_config

# One sequence per shard (shard_mb tiny): every sequence is a commit point to die around.
OVERRIDES = dict(
    data__limit=4,
    capture__shard_mb=0.001,
    capture__dtype="bfloat16",
    capture__hooks=["blocks.*.hook_resid_post", "blocks.1.mlp.hook_post"],
    runtime__batch_size=1,
    runtime__decode_slots=2,
)

KILLED = "killed by SIGKILL"
INTERRUPTED = "exit 130: interrupted: N sequences committed; run the same command again to resume"
DISK_FULL = "exit 2: disk full writing shard N of RUN: complete shards are committed; free space and run ..."

# failpoint -> (where it fires, expected outcome)
FAULTS = {
    "run_json.before_rename@1": ("first run.json written to its temp name, nothing committed", KILLED),
    "shard.building@1": ("inside the first shard write (one hook's array written)", KILLED),
    "shard.built@1": ("first shard complete and fsynced under its temp name", KILLED),
    "shard.renamed@1": ("between the shard rename and its commit record", KILLED),
    "commit.before_rename@1": ("during the commit: record written to its temp name", KILLED),
    "commit.renamed@1": ("commit record renamed, its folder not yet fsynced", KILLED),
    "shard.building@3": ("inside the third shard write, two shards committed", KILLED),
    "pipeline.sequence@3": ("mid-run: rows live in the engine, sequences queued for the writer", KILLED),
    "pipeline.summary@1": ("every shard committed; run.json and summary.json not final", KILLED),
    "run_json.before_rename@2": ("the final run.json write", KILLED),
    "pipeline.sequence@2:sigint": ("Ctrl-C mid-run", INTERRUPTED),
    "pipeline.sequence@2:sigterm": ("SIGTERM mid-run (a scheduler's stop)", INTERRUPTED),
    "shard.building@2:enospc": ("disk full inside the second shard write", DISK_FULL),
}


@pytest.fixture(scope="module")
def reference(real_vocab_model, tmp_path_factory):
    """(model folder, a persistent compile cache, the run that never failed)."""
    _, folder = real_vocab_model
    base = tmp_path_factory.mktemp("faults")
    cache = base / "xla-cache"
    raw = run_config(folder, base / "reference", runtime__compile_cache=str(cache), **OVERRIDES)
    cfg = base / "reference.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["run", str(cfg)]) == 0
    assert len(open_store(base / "reference").shards) >= 4
    return folder, cache, open_store(base / "reference")


def write_config(reference, out, tmp_path):
    folder, cache, _ = reference
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config(folder, out, runtime__compile_cache=str(cache), **OVERRIDES)))
    return cfg


def check_outcome(proc: subprocess.CompletedProcess, expected: str, out) -> None:
    lines = [x for x in proc.stdout.splitlines() if x.strip()]
    if expected == KILLED:
        assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:]
        return
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    errors = [x for x in lines if x.startswith("harvest: ")]
    assert len(errors) == 1, lines
    if expected == INTERRUPTED:
        assert proc.returncode == 130
        assert errors[0].startswith("harvest: interrupted: ") and "run the same command again to resume" in errors[0]
    else:
        assert proc.returncode == 2
        assert errors[0].startswith("harvest: error: disk full writing shard ") and str(out) in errors[0]
        assert "free space and run the same command again to resume" in errors[0]


@pytest.mark.parametrize("failpoint", FAULTS)
def test_fault_then_resume_equals_uninterrupted(reference, tmp_path, failpoint):
    out = tmp_path / "run"
    cfg = write_config(reference, out, tmp_path)
    proc = harvest_process(["run", str(cfg)], env={"HARVEST_FAILPOINT": failpoint})
    check_outcome(proc, FAULTS[failpoint][1], out)
    assert main(["run", str(cfg)]) == 0  # the same command resumes
    assert_same_run(open_store(out), reference[2])
    assert main(["verify", str(out), "--deep"]) == 0  # no leftovers, nothing damaged


def test_two_harvests_on_one_folder_and_a_stale_lock(reference, tmp_path, capsys):
    """The first harvest freezes while holding the run's lock: the second is refused in one line.
    Killed, it leaves a lock file behind but no lock: the same command then resumes."""
    out = tmp_path / "run"
    cfg = write_config(reference, out, tmp_path)
    env = {**os.environ, "HARVEST_FAILPOINT": "pipeline.sequence@2:stop"}
    first = subprocess.Popen([sys.executable, "-m", "harvest.cli.main", "run", str(cfg)], cwd=ROOT, env=env)
    try:
        deadline = time.time() + 240
        while _state(first.pid) != "T":
            assert first.poll() is None and time.time() < deadline, "the first harvest never reached its failpoint"
            time.sleep(0.1)
        assert main(["run", str(cfg)]) == 2
        assert capsys.readouterr().err.strip() == f"harvest: error: {out} is in use by another harvest process"
    finally:
        first.kill()
        first.wait()
    assert (out / ".lock").read_text().strip() == str(first.pid)  # the stale lock file of a dead process
    assert main(["run", str(cfg)]) == 0
    assert_same_run(open_store(out), reference[2])


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MiB tmpfs (root only), unmounted afterwards."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_real_disk_full_then_resume(reference, tmp_path, small_tmpfs):
    """A real full disk (the reference run needs several MiB): one line, exit 2; after the disk
    grows, the same command resumes to the reference's content."""
    out = small_tmpfs / "run"
    cfg = write_config(reference, out, tmp_path)
    proc = harvest_process(["run", str(cfg)])
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    errors = [x for x in proc.stdout.splitlines() if x.startswith("harvest: ")]
    assert len(errors) == 1 and "free space" in errors[0] and "resume" in errors[0], errors
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    assert main(["run", str(cfg)]) == 0
    assert_same_run(open_store(out), reference[2])


def test_every_fault_is_documented():
    doc = (ROOT / "docs" / "RELIABILITY.md").read_text()
    for failpoint, (where, _) in FAULTS.items():
        assert f"| `{failpoint}` | {where} |" in doc, failpoint


def test_repair_then_rerun_equals_uninterrupted(reference, tmp_path, capsys):
    """A flipped byte in a committed shard: verify finds it, --repair quarantines the shard, and the
    same harvest command regenerates exactly its sequences."""
    out = tmp_path / "run"
    shutil.copytree(reference[2].root, out)
    cfg = write_config(reference, out, tmp_path)
    target = next((out / "shards/000002.zarr/acts").glob("*/c/0/0"))
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0x01
    target.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1
    assert main(["verify", str(out), "--repair"]) == 0
    assert "moved commits/000002.json" in capsys.readouterr().out
    assert main(["run", str(cfg)]) == 0
    assert_same_run(open_store(out), reference[2])
    assert main(["verify", str(out), "--deep"]) == 0
