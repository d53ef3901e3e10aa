"""A whole harvest into s3:// (moto's standalone server, a real S3 endpoint): killed by SIGKILL in a
fresh process between a shard's uploads and its commit record, then resumed by the same command, it
leaves a store bit-identical to the same harvest on local disk, and `harvest verify --deep` and
`harvest info` read it by URL.
"""

from __future__ import annotations

import json
import signal

import pytest
import yaml

from harvest.cli.main import main
from harvest.data import open_store
from harvest.store.format import StoreLayout
from harvest.store.location import URL
from harvest.store.objectstore import files_for
from helpers.runs import assert_same_run, harvest_process, run_config
from helpers.s3 import s3_bucket  # noqa: F401 - a fixture

# One sequence per shard (shard_mb tiny): every sequence is a commit point to die around.
OVERRIDES = dict(
    data__limit=3,
    capture__shard_mb=0.001,
    capture__dtype="bfloat16",
    capture__hooks=["blocks.1.hook_resid_post"],
    runtime__batch_size=1,
    runtime__decode_slots=2,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(a persistent compile cache, the run that never failed, on local disk)."""
    base = tmp_path_factory.mktemp("remote-run")
    cache = base / "xla-cache"
    cfg = base / "reference.yaml"
    raw = run_config("random:tiny", base / "ref", runtime__compile_cache=str(cache), **OVERRIDES)
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["run", str(cfg)]) == 0
    assert len(open_store(base / "ref").shards) >= 3
    return cache, open_store(base / "ref")


def test_harvest_to_s3_killed_then_resumed_equals_local(reference, s3_bucket, tmp_path, capsys):  # noqa: F811
    cache, ref = reference
    out = URL(f"{s3_bucket}/runs/demo")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config("random:tiny", out, runtime__compile_cache=str(cache), **OVERRIDES)))
    proc = harvest_process(["run", str(cfg)], env={"HARVEST_FAILPOINT": "shard.renamed@2"})
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:]

    layout, files = StoreLayout(out), files_for(out)
    # the second shard's objects are uploaded but have no commit record: readers do not see them
    assert [sh.index for sh in open_store(out).shards] == [0]
    assert files.is_dir(layout.shard_path(1))
    assert files.exists(layout.lease_path(0))  # the dead process never released its lease

    # the same command resumes at once: the lease's process is gone from this machine
    assert main(["run", str(cfg)]) == 0
    assert_same_run(open_store(out), ref)
    assert not files.exists(layout.lease_path(0))  # released at the end
    meta = json.loads(files.read_bytes(layout.run_json))
    assert [s["removed_leftovers"] for s in meta["sessions"]] == [[], ["shards/000001.zarr"]]
    summary = json.loads(files.read_bytes(layout.summary_json))
    assert summary["sequences"] == ref.num_sequences and summary["bytes_on_disk"] > 0

    capsys.readouterr()
    assert main(["verify", out]) == 0  # no leftovers; every file matches its checksum
    assert main(["info", out]) == 0
    lines = capsys.readouterr().out
    assert "ok: no findings" in lines and f"{ref.num_sequences} sequences" in lines
