"""Run folders on object storage (docs/FORMAT.md, "Object storage"): a store written to S3 (moto's
standalone server, a real S3 endpoint on localhost) or to memory:// reads exactly like the same
store on local disk, through every read path; damage there is found and repaired; objects without
a commit record stay invisible; and the lease refuses a second writer in one line.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import time

import numpy as np
import pytest

from harvest.cli.main import main
from harvest.cli.output import check_output, prepare_output
from harvest.data import open_store
from harvest.store.chunks import ChunkReader
from harvest.store.format import ProcessShare, StoreLayout
from harvest.store.lease import Lease, check_held
from harvest.store.location import URL, PreconditionFailed, as_root
from harvest.store.objectstore import files_for
from harvest.store.runfolder import StoreError, lock_run, scan_run, write_json_atomic
from harvest.store.shard import ShardWriter
from harvest.store.verify import run_info, verify_run
from helpers.s3 import s3_bucket  # noqa: F401 - a fixture
from helpers.stores import HA, HB, assert_same, make_store

STORE = dict(shards=2, seqs_per_shard=3, dtype="bfloat16")


def reads(store) -> dict:
    """Every read path's result (the loader with its prefetch thread, the chunk reader, statistics)."""
    sid = int(store.shards[1].sequence_ids[0])
    return {
        "sequences": {k: np.asarray(v) for k, v in store.sequences.items()},
        "tokens": {k: store.tokens(k) for k in ("token_id", "position", "phase", "sequence", "first_token")},
        "activations": {h: store.activations(h)[:] for h in store.hooks},
        "rows": {h: store.activations(h)[np.arange(0, store.num_tokens, 3)] for h in store.hooks},
        "sequence": store.sequence(sid),
        "batches": [b for b in store.batches([HA, HB], 7, seed=3, prefetch=3, exclude=())],
        "stats": {h: store.stats(h).group("all").mean for h in store.hooks},
        "chunks": {h: chunk_reads(store, h) for h in store.hooks},
    }


def chunk_reads(store, hook: str) -> list:
    reader = ChunkReader(store, [hook])
    return [reader.read(hook, u) for u in store.chunk_index(hook)]


@pytest.fixture(scope="module")
def local_reads(tmp_path_factory):
    root = make_store(tmp_path_factory.mktemp("local") / "run", **STORE)
    return reads(open_store(root))


def test_s3_store_reads_like_local_disk_and_damage_is_found(s3_bucket, local_reads, capsys):  # noqa: F811
    url = URL(f"{s3_bucket}/runs/a")
    make_store(url, **STORE)
    write_json_atomic(url / "run.json", {"hooks": {HA: 8, HB: 16}})
    store = open_store(url)
    assert store.root == url and [sh.index for sh in store.shards] == [0, 1]
    assert_same(reads(store), local_reads)
    # statistics were cached on S3 (the JSON written last); a fresh store reads them from there
    files = files_for(url)
    assert files.is_file(store.layout.stats_dir / f"{HA}.json")
    assert_same(open_store(url).stats(HA).norms(), store.stats(HA).norms())
    assert run_info(url)["sequences"] == 6
    assert main(["info", url]) == 0 and f"run {url}" in capsys.readouterr().out
    assert main(["verify", url]) == 0 and "ok: no findings" in capsys.readouterr().out

    # a flipped byte in an activation object: no reader returns it, verify finds it, --repair sets it aside
    target = url / f"shards/000001.zarr/acts/{HA}/c/0/0"
    data = bytearray(files.read_bytes(target))
    data[len(data) // 2] ^= 0x04
    files.write_bytes(target, bytes(data))
    with pytest.raises(StoreError, match=f"shard 1 is damaged: 000001.zarr/acts/{HA}/c/0/0") as e:
        open_store(url).activations(HA)[:]
    assert f"harvest verify {url}" in str(e.value) and "\n" not in str(e.value)
    assert main(["verify", url]) == 1
    assert f"damaged: shards/000001.zarr/acts/{HA}/c/0/0: crc32c differs" in capsys.readouterr().out
    assert main(["verify", url, "--repair"]) == 0
    assert "moved commits/000001.json to quarantine/" in capsys.readouterr().out
    assert [sh.index for sh in open_store(url).shards] == [0]
    assert main(["verify", url, "--deep"]) == 0
    assert len(run_info(url)["quarantined"]) == 2  # the commit record and the shard


def test_memory_url_round_trip(local_reads):
    url = "memory://harvest-tests/run-a"
    try:
        make_store(url, **STORE)
        assert_same(reads(open_store(url)), local_reads)
        assert verify_run(url, deep=True).damaged_shards() == []
    finally:
        files_for(URL(url)).remove(URL(url))


def test_objects_without_a_commit_record_are_invisible_then_cleaned(s3_bucket):  # noqa: F811
    url = URL(f"{s3_bucket}/run")
    make_store(url, shards=3, seqs_per_shard=2)
    files = files_for(url)
    layout = StoreLayout(url)
    files.remove(layout.commit_path(2))  # a writer killed after its uploads, before the commit record
    assert [sh.index for sh in open_store(url).shards] == [0, 1]
    findings = [f.line() for f in verify_run(url).findings if f.kind != "run.json"]  # no run.json here
    assert findings == ["orphan: shards/000002.zarr: shard without a commit record"]
    other = scan_run(url, share=ProcessShare(1, 2))  # process 1 of 2 does not own shard 2: it stays
    assert other.removed == [] and files.is_dir(layout.shard_path(2)) and other.next_shard == 3
    res = scan_run(url)
    assert res.removed == ["shards/000002.zarr"] and res.next_shard == 2 and res.shards == [0, 1]
    assert not files.exists(layout.shard_path(2))


def test_lease_refuses_a_second_harvest_in_one_line(s3_bucket):  # noqa: F811
    url = URL(f"{s3_bucket}/run")
    layout = StoreLayout(url)
    files = files_for(url)
    with lock_run(url) as lease:
        assert isinstance(lease, Lease)
        doc = json.loads(files.read_bytes(layout.lease_path(0)))
        assert doc["process"] == [0, 1] and doc["expires"] > time.time()
        with pytest.raises(StoreError) as e:
            lock_run(url)  # the same index: refused
        message = str(e.value)
        assert message.startswith(f"{url} is in use by another harvest process (") and "\n" not in message
        assert f"lease {url}/leases/p0.json valid until" in message and "delete" in message
        with pytest.raises(StoreError, match="one of 1 processes; every process of a run uses one process count"):
            lock_run(url, ProcessShare(1, 2))  # a multi-process member beside a lone harvest
        lease.renew()  # renewal is a PUT conditional on the version we wrote
    assert not files.exists(layout.lease_path(0))  # released on exit
    with lock_run(url, ProcessShare(0, 2)), lock_run(url, ProcessShare(1, 2)):
        with pytest.raises(StoreError, match="is in use by another harvest process"):
            lock_run(url)  # a lone harvest (or verify --repair) beside a 2-process run


def test_expired_lease_is_taken_over_and_a_lost_lease_stops_commits(s3_bucket):  # noqa: F811
    url = URL(f"{s3_bucket}/run")
    layout = StoreLayout(url)
    files = files_for(url)
    dead = {"owner": "x", "host": "gone", "pid": 1, "process": [0, 1], "renewed": 0.0, "expires": time.time() - 1}
    files.write_bytes(layout.lease_path(0), json.dumps(dead).encode())
    with lock_run(url) as lease:  # a dead process's lease lapsed: taken over
        assert json.loads(files.read_bytes(layout.lease_path(0)))["owner"] == lease.token
        check_held(url)
        # another process takes the lease over (as if this one had stalled past its expiry)
        files.write_bytes(layout.lease_path(0), json.dumps(dead | {"owner": "y"}).encode())
        with pytest.raises(StoreError):
            lease.renew()
        lease.lost = "another process replaced it"  # what the renewal thread records
        with pytest.raises(StoreError, match=f"{url}: this process lost its lease"):
            make_store(url, shards=1, seqs_per_shard=1)
        assert not files.exists(layout.commit_path(0))  # nothing was committed
    assert json.loads(files.read_bytes(layout.lease_path(0)))["owner"] == "y"  # not ours: left alone


def test_output_url_checks(s3_bucket, tmp_path):  # noqa: F811
    from harvest.cli.config import ConfigError

    check_output(as_root(f"{s3_bucket}/fresh"))  # an empty prefix is fine
    with pytest.raises(ConfigError, match=r"output.path s3://no-such-bucket-x/run: bucket 'no-such-bucket-x' does"):
        check_output(as_root("s3://no-such-bucket-x/run"))
    files = files_for(URL(s3_bucket))
    files.write_bytes(URL(f"{s3_bucket}/mine/notes.txt"), b"not a run")
    with pytest.raises(ConfigError, match="exists and is not a harvest run folder"):
        check_output(as_root(f"{s3_bucket}/mine"))
    if importlib.util.find_spec("gcsfs") is None:  # one line that names the package and the extra
        with pytest.raises(ConfigError) as e:
            check_output(as_root("gs://bucket/run"))
        want = "output.path gs://bucket/run: install gcsfs to use gs:// URLs (pip install 'harvest[gcs]')"
        assert str(e.value) == want
    assert as_root(f"file://{tmp_path}") == tmp_path


def test_overwrite_on_s3_deletes_the_run_but_not_its_lease(s3_bucket):  # noqa: F811
    from harvest.cli.config import ConfigError, from_dict

    url = URL(f"{s3_bucket}/run")
    files = files_for(url)
    cfg = from_dict({"output": {"path": str(url)}})
    write_json_atomic(url / "run.json", {"config": {"generation": {"max_new_tokens": 3}}})
    files.write_bytes(url / "shards/000000.zarr/zarr.json", b"{}")
    with lock_run(url):
        with pytest.raises(ConfigError, match=f"{url} holds a run with a different config"):
            prepare_output(url, cfg, overwrite=False)
        prepare_output(url, cfg, overwrite=True)
        assert [p.name for p, _ in files.entries(url)] == ["leases"]


def test_late_commit_on_s3_never_replaces_a_newer_record(s3_bucket):  # noqa: F811
    """A writer whose `exists` check passed before another committed its index (a writer frozen past its
    lease) must not replace that commit record: on S3 the commit PUT is If-None-Match: *."""
    url = URL(f"{s3_bucket}/run")
    make_store(url, shards=1, seqs_per_shard=1)
    files, layout = files_for(url), StoreLayout(url)
    record = files.read_bytes(layout.commit_path(0))
    writer = ShardWriter(url, {HA: 8, HB: 16}, fsync=False)
    late = json.loads(record) | {"committed_at": 1.0}
    with pytest.raises(StoreError) as e:
        writer._commit(0, late)
    assert str(e.value) == "shard 0 is already committed; shards are immutable"
    assert files.read_bytes(layout.commit_path(0)) == record


def conflict(op: str) -> OSError:
    """An S3 409 ConditionalRequestConflict as s3fs raises it: OSError(EIO) caused by botocore's error."""
    from botocore.exceptions import ClientError

    code = "ConditionalRequestConflict"
    cause = ClientError({"Error": {"Code": code, "Message": "A conflicting conditional operation"}}, op)
    e = OSError(5, "A conflicting conditional operation is currently in progress")
    e.__cause__ = cause
    return e


def test_s3_conditional_errors_are_read_from_their_code(s3_bucket, monkeypatch):  # noqa: F811
    from harvest.store.objectstore import _failed_condition

    assert _failed_condition(conflict("PutObject"))
    e = OSError(22, "At least one of the pre-conditions you specified did not hold")
    assert _failed_condition(e)  # no botocore error attached: the message
    other = OSError(5, "precondition-ish words")
    other.__cause__ = conflict("PutObject").__cause__
    other.__cause__.response["Error"]["Code"] = "InternalError"
    assert not _failed_condition(other)  # the code wins over the message

    # a 409 while taking the lease (another process's conditional PUT to it in flight): one line, not EIO
    url = URL(f"{s3_bucket}/run")
    files, path = files_for(url), StoreLayout(url).lease_path(0)
    theirs = {"owner": "t", "host": "other", "pid": 7, "process": [0, 1], "renewed": 0.0, "expires": time.time() + 99}
    real = files.fs.pipe_file

    def racing(p, data, **kw):
        if kw.get("mode") == "create" and p.endswith("leases/p0.json"):
            real(p, json.dumps(theirs).encode())  # the other process's PUT lands; ours gets the 409
            raise conflict("PutObject")
        return real(p, data, **kw)

    monkeypatch.setattr(files.fs, "pipe_file", racing)
    with pytest.raises(StoreError) as e:
        lock_run(url)
    assert str(e.value).startswith(f"{url} is in use by another harvest process (other pid 7,")
    assert "\n" not in str(e.value) and json.loads(files.read_bytes(path))["owner"] == "t"


@pytest.mark.parametrize("where", ["s3", "memory"])
def test_a_released_lease_taken_over_meanwhile_is_not_deleted(where, s3_bucket, monkeypatch):  # noqa: F811
    url = URL(f"{s3_bucket}/run") if where == "s3" else URL("memory://harvest-tests/lease-release")
    files, path = files_for(url), StoreLayout(url).lease_path(0)
    try:
        lease = lock_run(url)
        # remove_if_match: the version read, or nothing
        data, tag = files.read_tagged(path)
        with pytest.raises(PreconditionFailed):
            files.remove_if_match(path, '"0123"' if where == "s3" else "0123")
        assert files.read_bytes(path) == data
        # another process takes the lease over just after the release read it (and found it ours): on S3
        # the DELETE is conditional on the version read; elsewhere remove_if_match compares once more
        read = files.read_tagged
        theirs = json.dumps({"owner": "y", "host": "h", "pid": 1, "process": [0, 1], "expires": 1e12}).encode()

        def read_then_taken_over(p):
            got = read(p)
            files.write_bytes(p, theirs)
            return got

        with monkeypatch.context() as m:
            m.setattr(files, "read_tagged", read_then_taken_over)
            lease.close()
        assert files.read_bytes(path) == theirs
        files.remove_if_match(path, files.read_tagged(path)[1])
        assert not files.exists(path)
        files.remove_if_match(path, "gone")  # a missing object: no error
    finally:
        if where == "memory":
            files.remove(url)


def test_staging_folders_are_removed_only_when_their_lock_is_free(tmp_path, monkeypatch):
    """A live staging folder of another pid namespace (its pid means nothing here) is spared while its
    lock is held; a stale one, and a lockless leftover older than a day, are removed."""
    import fcntl
    import os

    from harvest.store.location import STAGING, STAGING_LOCK, staging_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    base = tmp_path / STAGING
    folders = {}
    for name in ("999999999-live", "999999999-stale", "123-old", "124-recent", ".new-125-x"):
        folders[name] = base / name
        folders[name].mkdir(parents=True)
    for name in ("999999999-live", "999999999-stale"):
        (folders[name] / STAGING_LOCK).touch()
    day_ago = time.time() - 2 * 86400
    os.utime(folders["123-old"], (day_ago, day_ago))
    held = open(folders["999999999-live"] / STAGING_LOCK)  # another open file description: another process
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        with staging_dir() as mine:
            assert sorted(p.name for p in base.iterdir()) == sorted(
                [".new-125-x", "124-recent", "999999999-live", mine.name]
            )
            assert mine.name.startswith(f"{os.getpid()}-")
            with staging_dir() as other:  # a second writer's cleanup spares the first's live folder
                assert mine.is_dir() and other.is_dir() and other != mine
            with open(mine / STAGING_LOCK) as f, pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert not mine.exists() and folders["999999999-live"].is_dir()
    finally:
        held.close()
    with staging_dir():  # its lock released: stale now
        assert not folders["999999999-live"].exists()
