"""BackgroundWriter: shard splitting, threading, backpressure, errors, stats, SIGKILL + resume."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from harvest.data import open_store
from harvest.store.runfolder import scan_run
from harvest.store.writer import BackgroundWriter, SequenceRecord, WriterError
from helpers.fake_records import HOOKS, fake_record

BYTES_PER_SEQ = 12 * sum(HOOKS.values()) * 2  # 12 tokens, bf16


def _writer(run, **kw):
    kw.setdefault("fsync", False)
    return BackgroundWriter(run, HOOKS, **kw)


def test_sequences_fill_shards_and_never_span_two(tmp_path):
    w = _writer(tmp_path, shard_bytes=3 * BYTES_PER_SEQ, start_shard=4)
    w.put([fake_record(i) for i in range(5)])  # a plain list works too
    w.put(lambda: fake_record(5, n_prefill=100))  # bigger than shard_bytes: a shard of its own
    w.put(lambda: None)
    w.put(fake_record(6))
    st = w.close()
    assert st.shard_indices == [4, 5, 6, 7] and st.shards_written == 4
    s = open_store(tmp_path)
    assert [sh.sequence_ids for sh in s.shards] == [(0, 1, 2), (3, 4), (5,), (6,)]
    assert st.sequences_written == 7 and st.tokens_written == s.num_tokens == 6 * 12 + 105
    assert st.tokens_per_phase == {"prefill": 6 * 7 + 100, "decode": 7 * 5}


def test_callables_run_in_the_writer_thread(tmp_path):
    seen = []

    def batch():
        seen.append(threading.current_thread().name)
        return [fake_record(0)]

    with _writer(tmp_path) as w:
        w.put(batch)
    assert seen == ["harvest-writer"]
    assert open_store(tmp_path).num_sequences == 1


def test_put_blocks_when_the_queue_is_full(tmp_path):
    release = threading.Event()
    w = _writer(tmp_path, max_queue=2)
    w.put(lambda: release.wait(10) and [fake_record(0)])  # the writer thread is now busy in here
    time.sleep(0.3)
    w.put(lambda: [fake_record(1)])
    w.put(lambda: [fake_record(2)])  # queue is now full (2 items)
    done = threading.Event()
    t = threading.Thread(target=lambda: (w.put(lambda: [fake_record(3)]), done.set()))
    t.start()
    assert not done.wait(0.5)  # backpressure: the 4th put waits
    release.set()
    assert done.wait(10)
    t.join()
    assert w.close().sequences_written == 4


def test_writer_errors_reach_the_main_thread(tmp_path):
    w = _writer(tmp_path, max_queue=1)

    def boom():
        raise ValueError("device copy failed")

    w.put(boom)
    with pytest.raises(WriterError, match="device copy failed") as ei:
        for i in range(100):  # the writer is dead: put must raise, never hang on the full queue
            w.put(lambda i=i: [fake_record(i)])
    assert isinstance(ei.value.__cause__, ValueError)
    with pytest.raises(WriterError):
        w.close()


def test_bad_record_error_is_raised_by_close(tmp_path):
    w = _writer(tmp_path)
    w.put([fake_record(0)])
    w.put(lambda: [SequenceRecord({"sequence_id": 1}, {}, {})])
    with pytest.raises(WriterError, match="missing token columns"):
        w.close()
    with pytest.raises(WriterError, match="after close"):
        w.put([fake_record(2)])


def test_stats_and_compression_ratio(tmp_path):
    w = _writer(tmp_path, shard_bytes=2 * BYTES_PER_SEQ, storage_dtype="bfloat16")
    for i in range(4):
        w.put(lambda i=i: [fake_record(i)])
    st = w.close()
    assert st.shards_written == 2 and st.sequences_written == 4
    assert st.acts_raw_bytes == 4 * BYTES_PER_SEQ
    assert st.bytes_written > st.acts_bytes_written > 0
    assert st.compression_ratio == pytest.approx(st.acts_raw_bytes / st.acts_bytes_written)
    d = st.as_dict()
    assert d["tokens_per_phase"] == {"prefill": 28, "decode": 20} and "compression_ratio" in d


def test_context_manager_flushes_on_error_and_abort_does_not(tmp_path):
    with pytest.raises(KeyError):
        with _writer(tmp_path / "a") as w:
            w.put([fake_record(0)])
            raise KeyError("main loop failed")
    assert open_store(tmp_path / "a").num_sequences == 1  # complete sequences are kept
    w = _writer(tmp_path / "b")
    w.put([fake_record(0)])
    time.sleep(0.3)
    w.abort()
    assert open_store(tmp_path / "b").num_sequences == 0


def test_float32_compute_to_bfloat16_storage(tmp_path):
    with _writer(tmp_path, storage_dtype="bfloat16") as w:
        w.put([fake_record(0)])
    got = open_store(tmp_path).sequence(0)["blocks.0.hook_resid_post"]
    want = fake_record(0).acts["blocks.0.hook_resid_post"].astype(ml_dtypes.bfloat16)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


# A harvest stand-in: writes sequences 0..N-1 (skipping committed ones) in shards of 4 sequences.
_SCRIPT = textwrap.dedent("""
    import sys
    from helpers.fake_records import fake_record
    from harvest.store.runfolder import scan_run
    from harvest.store.writer import BackgroundWriter
    run, n = sys.argv[1], int(sys.argv[2])
    scan = scan_run(run)
    todo = [i for i in range(n) if i not in scan.committed_sequence_ids]
    hooks = {"blocks.0.hook_resid_post": 512, "blocks.1.mlp.hook_post": 1024}
    seq_bytes = 400 * 1536 * 2
    w = BackgroundWriter(run, hooks, shard_bytes=4 * seq_bytes, start_shard=scan.next_shard, max_queue=2)
    for i in todo:
        w.put(lambda i=i: [fake_record(i, n_prefill=300, n_decode=100, hooks=hooks)])
    w.close()
""")


def _spawn(run: Path, n: int) -> subprocess.Popen:
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parents[1]), str(here.parents[0])]))
    return subprocess.Popen([sys.executable, "-c", _SCRIPT, str(run), str(n)], env=env)


def _check_content(run: Path) -> set:
    hooks = {"blocks.0.hook_resid_post": 512, "blocks.1.mlp.hook_post": 1024}
    s = open_store(run)
    ids = set(s.sequences["sequence_id"].tolist())
    assert len(ids) == s.num_sequences  # nothing duplicated
    for sid in ids:
        got, want = s.sequence(sid), fake_record(sid, n_prefill=300, n_decode=100, hooks=hooks)
        for h in hooks:
            assert np.array_equal(got[h], want.acts[h].astype(ml_dtypes.bfloat16))
        assert np.array_equal(got["token_id"], want.tokens["token_id"])
    return ids


def test_sigkill_mid_write_leaves_only_complete_shards_and_resume_finishes(tmp_path):
    run, n = tmp_path / "run", 24
    p = _spawn(run, n)
    deadline = time.time() + 60
    while time.time() < deadline and not (
        len(list((run / "commits").glob("*.json"))) >= 2 and list((run / "shards").glob("*.tmp-*"))
    ):
        time.sleep(0.01)  # wait until the third shard is being built, then kill inside its write
    time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    before = _check_content(run)  # readable, committed shards only
    assert 8 <= len(before) < n
    scan = scan_run(run)
    assert scan.committed_sequence_ids == before
    assert not [q for q in run.rglob("*") if ".tmp-" in q.name or q.name.endswith(".partial")]

    p = _spawn(run, n)  # resume: same command, same folder
    assert p.wait(120) == 0
    assert _check_content(run) == set(range(n))
