"""The store's fault table (docs/RELIABILITY.md): damage one file of a committed shard in every way a
disk, a copy or a hand can, and check that no reader ever returns a wrong number.

Each row damages a copy of a 2-shard store. Every read path then either raises one StoreError that
names the run, the shard and the file, or returns exactly what the undamaged store returns. `harvest
verify` must report the file and exit 1; `--repair` quarantines the shard and leaves a store that
reads clean.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from harvest.cli.main import main
from harvest.data import open_store
from harvest.store.chunks import ChunkReader
from harvest.store.runfolder import StoreError
from helpers.stores import HA, HB, assert_same, make_store

V1_STORE = Path(__file__).parent / "data" / "v1-store"  # written by harvest 0.1 (format version 1)

# Files of a shard, one per kind: the group's and arrays' metadata, activation data, token and
# sequence columns.
FILE_KINDS = {
    "group metadata": "zarr.json",
    "activation metadata": f"acts/{HA}/zarr.json",
    "activation data": f"acts/{HA}/c/0/0",
    "second hook's data": f"acts/{HB}/c/0/0",
    "token column data": "token_id/c/0",
    "token column metadata": "position/zarr.json",
    "sequence column data": "sequences/sequence_id/c/0",
    "sequence table metadata": "sequences/zarr.json",
}
DAMAGE = ("flip", "truncate", "delete")


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x04
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.unlink()


def read_everything(store) -> dict:
    """Every public read path, each as a thunk, so each one is checked on its own."""
    sid_in_damaged = int(store.shards[1].sequence_ids[0])
    return {
        "sequences": lambda: {k: np.asarray(v) for k, v in store.sequences.items()},
        "tokens": lambda: {k: store.tokens(k) for k in ("token_id", "position", "phase", "sequence")},
        "activations": lambda: {h: store.activations(h)[:] for h in store.hooks},
        "activations[rows]": lambda: {h: store.activations(h)[np.arange(0, store.num_tokens, 3)] for h in store.hooks},
        "sequence": lambda: store.sequence(sid_in_damaged),
        "batches": lambda: {
            h: np.concatenate(list(store.batches(h, 7, shuffle=False, exclude=()))) for h in store.hooks
        },
        "stats": lambda: {h: store.stats(h, recompute=True).group("all").mean for h in store.hooks},
        "chunk reader": lambda: {
            h: [ChunkReader(store, [h]).read(h, u) for u in store.chunk_index(h)] for h in store.hooks
        },
    }


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = make_store(tmp_path_factory.mktemp("pristine") / "run", shards=2, seqs_per_shard=3, dtype="bfloat16")
    (root / "run.json").write_text(json.dumps({"hooks": {HA: 8, HB: 16}}))
    expected = {name: read() for name, read in read_everything(open_store(root)).items()}
    return root, expected


@pytest.fixture
def copy(pristine, tmp_path):
    root, _ = pristine
    dst = tmp_path / "run"
    shutil.copytree(root, dst)
    return dst


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("kind", FILE_KINDS)
def test_damaged_file_is_never_read_as_data(pristine, copy, capsys, kind, how):
    _, expected = pristine
    rel = FILE_KINDS[kind]
    damage(copy / "shards/000001.zarr" / rel, how)
    store = open_store(copy)  # opening reads only the commit records
    raised = 0
    for name, read in read_everything(store).items():
        try:
            got = read()
        except StoreError as e:
            message = str(e)
            assert "\n" not in message and f"shard 1 is damaged: 000001.zarr/{rel}" in message, (name, message)
            assert f"harvest verify {copy}" in message
            raised += 1
        else:  # a path that does not touch the damaged bytes must return exactly the right data
            assert_same(got, expected[name], name)
    assert raised >= 1  # every file kind is read by some path

    assert main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert f"damaged: shards/000001.zarr/{rel}" in out

    assert main(["verify", str(copy), "--repair"]) == 0
    repaired = open_store(copy)
    assert [sh.index for sh in repaired.shards] == [0]
    assert len(list((copy / "quarantine").glob("*/000001.*"))) == 2  # the shard and its commit record
    assert main(["verify", str(copy), "--deep"]) == 0


def test_deep_verify_decodes_every_chunk(copy, capsys):
    # A flipped byte inside activation data is found by the whole-file checksum and, with --deep, by
    # the chunk's own crc32c as well.
    damage(copy / f"shards/000000.zarr/acts/{HB}/c/0/0", "flip")
    assert main(["verify", str(copy), "--deep"]) == 1
    lines = [x for x in capsys.readouterr().out.splitlines() if "damaged:" in x]
    assert any("crc32c differs from the commit record" in x for x in lines), lines


def test_deleted_commit_record_hides_the_shard_until_the_harvest_redoes_it(pristine, copy, capsys):
    _, expected = pristine
    (copy / "commits/000001.json").unlink()
    store = open_store(copy)
    assert [sh.index for sh in store.shards] == [0]  # uncommitted data is never visible
    n0 = store.shards[0].num_tokens
    assert np.array_equal(store.activations(HA)[:], expected["activations"][HA][:n0])
    assert main(["verify", str(copy)]) == 1
    assert "orphan: shards/000001.zarr: shard without a commit record" in capsys.readouterr().out
    assert main(["verify", str(copy), "--repair"]) == 0
    assert not (copy / "shards/000001.zarr").exists()  # removed, as a resume would


def test_truncated_commit_record_names_the_file(copy, capsys):
    path = copy / "commits/000001.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(StoreError, match=r"commits/000001\.json:\d+:\d+: commit record is not valid JSON"):
        open_store(copy)
    assert main(["verify", str(copy)]) == 1
    assert "commit: commits/000001.json" in capsys.readouterr().out
    assert main(["verify", str(copy), "--repair"]) == 0
    assert [sh.index for sh in open_store(copy).shards] == [0]


def test_deleted_shard_folder(copy, capsys):
    shutil.rmtree(copy / "shards/000001.zarr")
    store = open_store(copy)
    with pytest.raises(StoreError, match="shard 1 is damaged: 000001.zarr: the shard folder is missing"):
        store.activations(HA)[:]
    assert main(["verify", str(copy)]) == 1
    assert "damaged: shards/000001.zarr: the shard folder is missing" in capsys.readouterr().out
    assert main(["verify", str(copy), "--repair"]) == 0
    assert [sh.index for sh in open_store(copy).shards] == [0]


def test_truncated_run_json_is_named_and_not_repairable(copy, capsys):
    (copy / "run.json").write_text('{"hooks": {')
    store = open_store(copy)  # the data does not depend on run.json
    with pytest.raises(StoreError, match=r"run\.json:1:\d+: run.json is not valid JSON"):
        _ = store.metadata
    assert main(["verify", str(copy), "--repair"]) == 1
    assert "run.json cannot be repaired" in capsys.readouterr().out


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.mkdir(), "is not a harvest run folder (it has no commits/ or run.json)"),
        (lambda p: None, "no run folder at"),
        (lambda p: make_store(p, shards=1) and None, "is one shard of a run; open the run folder"),
    ],
    ids=["plain folder", "missing", "one shard"],
)
def test_open_store_refuses_what_is_not_a_run(tmp_path, capsys, make, message):
    target = tmp_path / "x"
    make(target)
    if (target / "shards").is_dir():
        target = target / "shards/000000.zarr"
    with pytest.raises(StoreError, match=message.replace("(", r"\(").replace(")", r"\)")):
        open_store(target)
    assert main(["info", str(target)]) == 2
    assert message in capsys.readouterr().err


def test_version_1_store_still_reads(tmp_path, capsys):
    root = shutil.copytree(V1_STORE, tmp_path / "v1")
    store = open_store(root)
    assert store.num_sequences == 6 and store.hooks == [HA, HB] and store.storage_dtype == "bfloat16"
    x = store.activations(HA)[:]  # column 0 encodes the global row (tests/helpers/stores.py)
    assert np.allclose(np.asarray(x[:, 0], np.float32), np.arange(store.num_tokens) * 1e-3, rtol=1e-2, atol=1e-3)
    batch = np.concatenate(list(store.batches(HB, 5, shuffle=False, exclude=())))
    assert np.array_equal(np.asarray(batch), np.asarray(store.activations(HB)[:]))
    assert main(["verify", str(root), "--deep"]) == 0
    assert "2 shards are format version 1: no checksums to compare" in capsys.readouterr().out
    assert main(["info", str(root)]) == 0
    assert "(format 1)" in capsys.readouterr().out


def test_every_file_kind_is_documented():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "RELIABILITY.md").read_text()
    for kind, rel in FILE_KINDS.items():
        shown = rel.replace(HA, "<hook>").replace(HB, "<hook 2>")
        assert f"| {kind}: `{shown}` |" in doc, kind


def test_file_deleted_after_the_store_opened(copy):
    """The training loader plans its reads when it starts; a file that vanishes later is still refused."""
    store = open_store(copy)
    assert len(store.sequences) == 6  # opens (and checks) every shard
    (copy / f"shards/000001.zarr/acts/{HA}/c/0/0").unlink()
    with pytest.raises(StoreError, match=f"shard 1 is damaged: 000001.zarr/acts/{HA}/c/0/0: file is missing"):
        ChunkReader(store, [HA])
