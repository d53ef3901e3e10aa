"""Shard format, commit protocol and resume scan (harvest.store.shard)."""

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import zarr

from harvest.data import open_store
from harvest.store.runfolder import StoreError, StoreLayout, lock_run, read_run_metadata, scan_run, write_run_metadata
from harvest.store.shard import ShardWriter, build_sequence_table, chunk_rows
from helpers.fake_records import HOOKS, fake_record


def _write(run, indices, dtype="bfloat16", codec="blosc-zstd", per_shard=3, **kw):
    sw = ShardWriter(run, HOOKS, storage_dtype=dtype, codec=codec, fsync=False, **kw)
    infos = []
    for i in indices:
        recs = [sw.prepare_record(fake_record(i * per_shard + j)) for j in range(per_shard)]
        infos.append(sw.write(i, recs))
    return infos


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_roundtrip_is_exact_in_storage_dtype(tmp_path, dtype):
    _write(tmp_path, [0, 1], dtype=dtype)
    s = open_store(tmp_path)
    logical = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    for sid in range(6):
        rec, got = fake_record(sid), s.sequence(sid)
        for h in HOOKS:
            want = rec.acts[h].astype(logical)
            assert got[h].dtype == logical
            # compare bits: bf16 must be bit-exact, not merely close
            assert np.array_equal(got[h].view(np.uint8), want.view(np.uint8))
    arr = zarr.open_group(str(tmp_path / "shards/000000.zarr"), mode="r")["acts/blocks.0.hook_resid_post"]
    assert arr.dtype == (np.uint16 if dtype == "bfloat16" else np.dtype(dtype))
    assert arr.attrs["logical_dtype"] == dtype
    assert arr.attrs["hook"] == "blocks.0.hook_resid_post"


def test_bfloat16_input_is_stored_bit_exact(tmp_path):
    sw = ShardWriter(tmp_path, {"h": 8}, storage_dtype="bfloat16", fsync=False)
    rec = fake_record(0, hooks={"h": 8}, dtype=ml_dtypes.bfloat16)
    rec.acts["h"][0, :3] = [np.inf, -0.0, np.nan]  # odd values survive too
    sw.write(0, [sw.prepare_record(rec)])
    got = open_store(tmp_path).sequence(0)["h"]
    assert np.array_equal(got.view(np.uint16), rec.acts["h"].view(np.uint16))


def test_chunks_never_split_d_and_whole_array_is_one_shard_object(tmp_path):
    hooks = {"blocks.3.hook_resid_post": 896, "blocks.3.mlp.hook_post": 4864}
    sw = ShardWriter(tmp_path, hooks, fsync=False)
    rec = fake_record(0, n_prefill=3000, n_decode=100, hooks=hooks)
    sw.write(0, [sw.prepare_record(rec)])
    g = zarr.open_group(str(tmp_path / "shards/000000.zarr"), mode="r")
    for h, w in hooks.items():
        a = g["acts"][h]
        assert a.shape == (3100, w)
        assert a.chunks[1] == w and a.shards[1] == w  # never chunked along d
        assert 2 << 20 <= a.chunks[0] * w * 2 <= 4 << 20  # inner chunks of 2-4 MiB
        assert a.shards[0] >= a.shape[0]  # one shard object per array
        objs = [p for p in (tmp_path / "shards/000000.zarr/acts" / h).rglob("*") if p.is_file()]
        assert sorted(p.name for p in objs) == ["0", "zarr.json"]
    assert chunk_rows(896, 2) == 2048 and chunk_rows(4864, 2) == 256 and chunk_rows(18944, 4) == 32


@pytest.mark.parametrize("codec", ["none", "zstd", "blosc-zstd"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_codec_is_configurable_and_recorded(tmp_path, codec, dtype):
    info = _write(tmp_path, [0], dtype=dtype, codec=codec)[0]
    commit = json.loads((tmp_path / "commits/000000.json").read_text())
    assert commit["codec"]["name"] == codec == info["codec"]["name"]
    g = zarr.open_group(str(tmp_path / "shards/000000.zarr"), mode="r")
    assert g.attrs["codec"] == commit["codec"]
    meta = g["acts/blocks.0.hook_resid_post"].metadata.to_dict()
    inner = meta["codecs"][0]["configuration"]["codecs"]
    names = [c["name"] for c in inner]
    assert names[-1] == "crc32c"  # format version 2: every chunk carries its checksum, whatever the codec
    if codec == "blosc-zstd":
        assert names == ["bytes", "blosc", "crc32c"]
        conf = inner[1]["configuration"]
        assert conf["cname"] == "zstd" and conf["clevel"] == 1 and conf["shuffle"] == "shuffle"
        assert conf["blocksize"] == 1 << 20
        assert conf["typesize"] == (2 if dtype == "bfloat16" else 4)  # must match the element size
    else:
        assert names == (["bytes", "crc32c"] if codec == "none" else ["bytes", "zstd", "crc32c"])
    assert open_store(tmp_path).codec == commit["codec"]


def test_only_committed_shards_are_visible_and_scan_cleans_leftovers(tmp_path):
    layout = StoreLayout(tmp_path)
    _write(tmp_path, [0, 1])
    _write(tmp_path, [2])
    layout.commit_path(2).unlink()  # crash after the rename, before the commit record
    tmp_shard = layout.shards_dir / "000003.zarr.tmp-123-abcd"  # crash while building
    (tmp_shard / "acts").mkdir(parents=True)
    (tmp_shard / "acts/x.partial").write_bytes(b"junk")
    (layout.shards_dir / "000000.zarr/acts/blocks.0.hook_resid_post/c/0.partial").write_bytes(b"junk")
    (layout.commits_dir / "000003.json.tmp-123-abcd").write_text("{")
    (layout.shards_dir / "README.txt").write_text("user file: kept")

    s = open_store(tmp_path)
    assert [sh.index for sh in s.shards] == [0, 1] and s.num_sequences == 6

    dry = scan_run(tmp_path, clean=False)
    assert tmp_shard.exists() and dry.removed
    res = scan_run(tmp_path)
    assert res.committed_sequence_ids == set(range(6))
    assert res.next_shard == 2 and res.shards == [0, 1] and res.num_tokens == 6 * 12
    assert sorted(res.removed) == sorted(
        [
            "commits/000003.json.tmp-123-abcd",
            "shards/000002.zarr",
            "shards/000003.zarr.tmp-123-abcd",
            "shards/000000.zarr/acts/blocks.0.hook_resid_post/c/0.partial",
        ]
    )
    assert sorted(os.listdir(layout.shards_dir)) == ["000000.zarr", "000001.zarr", "README.txt"]
    assert sorted(os.listdir(layout.commits_dir)) == ["000000.json", "000001.json"]
    assert scan_run(tmp_path).removed == []
    # the freed index is reused by the resumed writer
    _write(tmp_path, [res.next_shard])
    assert open_store(tmp_path).num_sequences == 9


def test_scan_of_empty_or_missing_run(tmp_path):
    res = scan_run(tmp_path / "nothing")
    assert res.committed_sequence_ids == set() and res.next_shard == 0 and res.removed == []


def test_commit_without_shard_and_duplicate_ids_are_errors(tmp_path):
    _write(tmp_path, [0, 1])
    import shutil

    shutil.rmtree(tmp_path / "shards/000001.zarr")
    with pytest.raises(StoreError, match="missing"):
        scan_run(tmp_path)
    (tmp_path / "commits/000001.json").unlink()
    sw = ShardWriter(tmp_path, HOOKS, fsync=False)
    sw.write(5, [sw.prepare_record(fake_record(0))])  # sequence 0 again
    with pytest.raises(StoreError, match="repeats"):
        scan_run(tmp_path)
    with pytest.raises(StoreError, match="more than one shard"):
        open_store(tmp_path)


def test_committed_shards_are_immutable(tmp_path):
    _write(tmp_path, [0])
    with pytest.raises(StoreError, match="already committed"):
        _write(tmp_path, [0])
    sw = ShardWriter(tmp_path, HOOKS, fsync=False)
    rec = sw.prepare_record(fake_record(7))
    with pytest.raises(StoreError, match="duplicate"):
        sw.write(1, [rec, rec])  # fails inside the build: the temp dir is removed
    assert sorted(os.listdir(tmp_path / "shards")) == ["000000.zarr"]


def test_fsync_path_and_no_temp_files_left(tmp_path):
    sw = ShardWriter(tmp_path, HOOKS, fsync=True)
    sw.write(0, [sw.prepare_record(fake_record(0))])
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial")]
    assert leftovers == []


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: r.tokens.pop("row"), "missing token columns"),
        (lambda r: r.tokens.__setitem__("phase", np.zeros(3)), "shape"),
        (lambda r: r.acts.__setitem__("blocks.0.hook_resid_post", np.zeros((12, 5))), "shape"),
        (lambda r: r.acts.pop("blocks.1.mlp.hook_post"), "hooks"),
        (lambda r: r.tokens.__setitem__("position", np.arange(12)[::-1].copy()), "increasing"),
        (lambda r: r.tokens.__setitem__("phase", np.arange(12)[::-1] % 2), "before prefill"),
        (lambda r: r.meta.pop("sequence_id"), "sequence_id"),
        (lambda r: r.meta.__setitem__("token_offset", 3), "reserved"),
    ],
)
def test_bad_records_are_rejected(tmp_path, mutate, match):
    sw = ShardWriter(tmp_path, HOOKS, fsync=False)
    rec = fake_record(0)
    mutate(rec)
    with pytest.raises(StoreError, match=match):
        sw.write(0, [sw.prepare_record(rec)])
    assert not list((tmp_path / "shards").iterdir())  # a failed build leaves nothing behind


def test_sequence_table_kinds():
    t = build_sequence_table(
        [
            {"sequence_id": 1, "task_id": "a", "n": 1, "f": 1, "b": True, "s": "x", "d": {"k": 1}, "z": None},
            {"sequence_id": 2, "n": None, "f": 2.5, "b": np.bool_(False), "s": None, "d": [1], "z": None},
        ]
    )
    assert t["n"].dtype == np.int64 and list(t["n"]) == [1, -1]
    assert t["f"].dtype == np.float64 and list(t["f"]) == [1.0, 2.5]
    assert t["b"].dtype == np.bool_ and list(t["b"]) == [True, False]
    assert list(t["s"]) == ["x", ""] and list(t["d"]) == ['{"k": 1}', "[1]"]
    assert "z" not in t  # None everywhere: nothing to store
    assert list(t["task_id"]) == ["a", ""] and np.isnan(t["pixel_accuracy"]).all()
    assert list(t["pred_h"]) == [-1, -1] and t["correct"].dtype == np.bool_
    with pytest.raises(StoreError, match="mixes"):
        build_sequence_table([{"sequence_id": 1, "m": 1}, {"sequence_id": 2, "m": "x"}])


def test_run_metadata_roundtrip(tmp_path):
    meta = {
        "config": {"model": {"path": "random:tiny"}},
        "versions": {"zarr": zarr.__version__},
        "n": np.int64(3),
        "started": "2026-01-01T00:00:00",
    }
    write_run_metadata(tmp_path / "run", meta)
    write_run_metadata(tmp_path / "run", meta | {"ended": "later"})
    got = read_run_metadata(tmp_path / "run")
    assert got["config"] == meta["config"] and got["n"] == 3 and got["ended"] == "later"
    assert os.listdir(tmp_path / "run") == ["run.json"]
    assert open_store(tmp_path / "run").metadata == got
    with pytest.raises(FileNotFoundError):
        read_run_metadata(tmp_path / "other")


def test_plain_zarr_open_recipe(tmp_path):
    """The recipe in docs/FORMAT.md, verbatim apart from the path."""
    _write(tmp_path, [0, 1], dtype="bfloat16")
    run = str(tmp_path)

    import glob
    import json

    import ml_dtypes
    import numpy as np
    import zarr

    hook = "blocks.0.hook_resid_post"
    xs, phases, texts = [], [], []
    for commit in sorted(glob.glob(f"{run}/commits/*.json")):  # committed shards only
        rec = json.load(open(commit))
        g = zarr.open(f"{run}/{rec['path']}", mode="r")
        a = g["acts"][hook]  # [n, d]
        x = a[:]
        if a.attrs.get("logical_dtype") == "bfloat16":
            x = x.view(ml_dtypes.bfloat16)
        xs.append(x)
        phases.append(g["phase"][:])  # [n] int8: 0 prefill, 1 decode
        texts += list(g["sequences"]["generated_text"][:])
    x = np.concatenate(xs)

    s = open_store(tmp_path)
    assert np.array_equal(x.view(np.uint16), s.activations(hook)[:].view(np.uint16))
    assert np.array_equal(np.concatenate(phases), s.tokens("phase"))
    assert texts == list(s.sequences["generated_text"]) and "é" in texts[0]


def test_lock_run_is_exclusive_across_processes(tmp_path):
    import subprocess
    import sys

    held = lock_run(tmp_path)
    code = "import sys; from harvest.store.runfolder import lock_run; lock_run(sys.argv[1])"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    cmd = [sys.executable, "-c", code, str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "in use by another harvest process" in r.stderr
    held.close()
    assert subprocess.run(cmd, env=env).returncode == 0


def test_float16_overflow_is_refused_not_stored_as_inf():
    from harvest.store.shard import to_storage

    assert to_storage(np.array([[1.0, -60000.0]], np.float32), "float16").dtype == np.float16
    with pytest.raises(StoreError, match="overflow float16"):
        to_storage(np.array([[1.0, 70000.0]], np.float32), "float16")


@pytest.mark.parametrize("codec", ["blosc-zstd", "zstd", "none"])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
@pytest.mark.parametrize("threads", [1, 3])
def test_shard_object_is_byte_identical_to_zarrs(tmp_path, codec, dtype, threads):
    """The writer builds each activation array's storage object itself (inner chunks compressed in
    parallel); zarr writing the same array produces exactly the same bytes."""
    from concurrent.futures import ThreadPoolExecutor

    from harvest.store.shard import _ARRAY_CONFIG, BLOSC_BLOCKSIZE, _compressors
    from harvest.store.shardfile import compressor, write_shard_object

    rng = np.random.default_rng(3)
    n, d, rows = 1000, 48, 64  # the last inner chunk is partial: zarr pads it with zeros
    data = (rng.standard_normal((n, d)) * 3).astype(np.float32)
    data = data.astype(np.float16).view(np.uint16) if dtype == np.uint16 else data
    g = zarr.open_group(str(tmp_path), mode="w", zarr_format=3)
    kw = dict(shape=data.shape, dtype=data.dtype, chunks=(rows, d), shards=(-(-n // rows) * rows, d),
              compressors=_compressors(codec, 1, data.dtype.itemsize), config=_ARRAY_CONFIG)  # fmt: skip
    g.create_array("by_zarr", **kw)[...] = data
    g.create_array("by_harvest", **kw)
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    codec_ = compressor(codec, 1, data.dtype.itemsize, BLOSC_BLOCKSIZE)
    write_shard_object(tmp_path / "by_harvest/c/0/0", data, rows, codec_, pool)
    assert (tmp_path / "by_harvest/c/0/0").read_bytes() == (tmp_path / "by_zarr/c/0/0").read_bytes()
    assert np.array_equal(g["by_harvest"][...], data)
