"""Several processes writing one run folder (docs/FORMAT.md, "Several processes"): process p of n owns
the shard indices i with i % n == p, so names never collide; each resumes and cleans up only its own
share; the locks keep two processes of one index, or a lone harvest and a multi-process run, apart;
and readers and `harvest verify` see every process's shards as one store.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from harvest.cli.main import main
from harvest.cli.output import check_output
from harvest.data import open_store
from harvest.store.format import ProcessShare, StoreLayout
from harvest.store.location import URL
from harvest.store.objectstore import files_for
from harvest.store.runfolder import StoreError, lock_run, scan_run, write_json_atomic
from harvest.store.shard import SequenceRecord
from harvest.store.verify import verify_run
from harvest.store.writer import BackgroundWriter
from helpers.s3 import s3_bucket  # noqa: F401 - a fixture

HOOKS = {"blocks.0.hook_resid_post": 8}


def test_process_share_owns_one_residue():
    a, b = ProcessShare(0, 2), ProcessShare(1, 2)
    assert [i for i in range(7) if a.owns(i)] == [0, 2, 4, 6] and [i for i in range(7) if b.owns(i)] == [1, 3, 5]
    assert a.first_after(-1) == 0 and b.first_after(-1) == 1
    assert a.first_after(5) == 6 and b.first_after(5) == 7 and b.first_after(6) == 7
    assert ProcessShare(2, 3).first_after(9) == 11 and ProcessShare().first_after(9) == 10
    for bad in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="want 0 <= index < count"):
            ProcessShare(*bad)


def record(sid: int, n: int = 5) -> SequenceRecord:
    rows = np.arange(n)
    tokens = {
        "token_id": rows.astype(np.int32) + sid,
        "position": rows.astype(np.int32),
        "phase": np.zeros(n, np.int8),
        "segment": np.zeros(n, np.int8),
        "example": np.full(n, -1, np.int16),
        "row": np.full(n, -1, np.int16),
        "col": np.full(n, -1, np.int16),
    }
    acts = {h: np.full((n, w), sid, np.float32) + rows[:, None] for h, w in HOOKS.items()}
    return SequenceRecord({"sequence_id": sid, "task_id": f"t{sid}"}, tokens, acts)


def write_as(root, share: ProcessShare, sids: list[int], start: int | None = None) -> list[int]:
    """One process's writer: a shard per sequence, at the indices it owns. -> the shard indices."""
    start = share.first_after(-1) if start is None else start
    w = BackgroundWriter(root, HOOKS, "float32", shard_bytes=1, start_shard=start, shard_stride=share.count)
    with w:
        for sid in sids:
            w.put(record(sid))
    return w.stats.shard_indices


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return tmp_path / "run"
    return URL(f"{request.getfixturevalue('s3_bucket')}/run")


def test_two_processes_write_one_store(root):
    shares = [ProcessShare(0, 2), ProcessShare(1, 2)]
    work = {0: [0, 2, 4], 1: [1]}  # the pipeline's admission split; any split works, gaps included
    written: dict[int, list[int]] = {}
    threads = [
        threading.Thread(target=lambda s=s: written.__setitem__(s.index, write_as(root, s, work[s.index])))
        for s in shares
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert written == {0: [0, 2, 4], 1: [1]}  # interleaved, never colliding; no shard 3
    write_json_atomic(StoreLayout(root).run_json, {"hooks": HOOKS})

    store = open_store(root)  # every process's commit records: one store
    assert [sh.index for sh in store.shards] == [0, 1, 2, 4] and store.num_sequences == 4
    assert list(store.sequences["sequence_id"]) == [0, 1, 2, 4]  # shard order
    x = store.activations("blocks.0.hook_resid_post")[:]
    assert np.array_equal(x[:, 0], np.concatenate([np.arange(5) + s for s in (0, 1, 2, 4)]))
    assert sum(len(b) for b in store.batches("blocks.0.hook_resid_post", 4, exclude=())) == 20
    report = verify_run(root, deep=True)
    assert report.ok, [f.line() for f in report.findings]  # no orphan, no gap finding

    # resuming: each process continues above every committed index, at its own residue
    assert [scan_run(root, share=s).next_shard for s in shares] == [6, 5]
    assert write_as(root, shares[1], [5], start=5) == [5]
    assert [scan_run(root, share=s).next_shard for s in shares] == [6, 7]
    assert open_store(root).num_sequences == 5


def test_each_process_cleans_only_its_own_leftovers(tmp_path):
    root = tmp_path / "run"
    layout = StoreLayout(root)
    write_as(root, ProcessShare(0, 2), [0, 2])  # shards 0, 2
    write_as(root, ProcessShare(1, 2), [1, 3])  # shards 1, 3
    for i in (2, 3):  # each process died after its shard, before the commit record
        layout.commit_path(i).unlink()
    (layout.commits_dir / "000005.json.tmp-9-ab").write_text("{")  # process 1's
    (root / "run.json.tmp-9-ab").write_text("{")  # process 0's: root-level files are process 0's

    one = scan_run(root, share=ProcessShare(1, 2))
    assert sorted(one.removed) == ["commits/000005.json.tmp-9-ab", "shards/000003.zarr"]
    assert layout.shard_path(2).is_dir() and (root / "run.json.tmp-9-ab").exists()  # process 0's: kept
    assert one.next_shard == 3 and one.committed_sequence_ids == {0, 1}
    zero = scan_run(root, share=ProcessShare(0, 2))
    assert sorted(zero.removed) == ["run.json.tmp-9-ab", "shards/000002.zarr"] and zero.next_shard == 2


def test_local_locks_per_process(tmp_path, capsys):
    root = tmp_path / "run"
    write_as(root, ProcessShare(), [0])  # a run without run.json: a finding verify --repair acts on
    with lock_run(root, ProcessShare(0, 2)), lock_run(root, ProcessShare(1, 2)):
        for share in (ProcessShare(1, 2), ProcessShare()):  # the same index again; a lone harvest
            with pytest.raises(StoreError) as e:
                lock_run(root, share)
            assert str(e.value) == f"{root} is in use by another harvest process"
        assert main(["verify", str(root), "--repair"]) == 2  # repair waits for every process
        assert capsys.readouterr().err.strip() == f"harvest: error: {root} is in use by another harvest process"
        assert (root / ".lock.p1").read_text().strip().isdigit()
        check_output(root)  # .lock.pN files belong to a run folder
    with lock_run(root):
        with pytest.raises(StoreError, match="is in use by another harvest process"):
            lock_run(root, ProcessShare(1, 2))  # a multi-process member beside a lone harvest
    with lock_run(root, ProcessShare(1, 2)):  # everything was released
        pass


def test_remote_leases_per_process(s3_bucket):  # noqa: F811
    url = URL(f"{s3_bucket}/run")
    files = files_for(url)
    with lock_run(url, ProcessShare(0, 2)), lock_run(url, ProcessShare(1, 2)):
        names = sorted(p.name for p, _ in files.entries(StoreLayout(url).leases_dir))
        assert names == ["p0.json", "p1.json"]
        with pytest.raises(StoreError, match="is in use by another harvest process"):
            lock_run(url, ProcessShare(1, 2))
        with pytest.raises(StoreError, match="one of 2 processes; every process of a run uses one process count"):
            lock_run(url, ProcessShare(2, 3))
    assert files.entries(StoreLayout(url).leases_dir) == []
