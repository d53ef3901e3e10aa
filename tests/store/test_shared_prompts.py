"""Shared prompt prefixes (format version 3): a sequence stores only its prompt rows past the prefix
it shares with an earlier sequence, and `sequence()` rebuilds it whole from its donors.

Stores are written from one ground truth: "full" (every sequence stores all its rows, in a
version-2 store without the sharing columns) and "shared" (followers store only the rows past their
shared length, with the two sequence columns). Reading a sequence from either must return the
ground truth, exactly: every column, dtype and shape.
"""

from __future__ import annotations

import shutil

import ml_dtypes
import numpy as np
import pytest

from harvest.cli.main import main
from harvest.data import open_store
from harvest.store import shard as shard_module
from harvest.store.format import SEQUENCE_COLUMNS, TOKEN_COLUMNS, StoreLayout
from harvest.store.runfolder import StoreError, write_run_metadata
from harvest.store.shard import SequenceRecord, ShardWriter
from harvest.store.verify import verify_run
from helpers.stores import HA, HB, assert_same

HOOKS = {HA: 8, HB: 16}
# sequence id -> (donor, shared prompt length, prompt length, generated length)
SPEC = {
    0: (-1, 0, 20, 5),
    1: (0, 20, 20, 3),  # the same prompt (generation.samples > 1)
    2: (1, 20, 20, 0),  # the same again, through a follower that stores no prompt row; nothing generated
    3: (0, 12, 25, 4),  # a shared prefix of another length
    4: (3, 18, 30, 2),  # a chain: rows 0..11 from 0, 12..17 from 3
    5: (4, 28, 32, 6),  # a chain of four: 0..11 from 0, 12..17 from 3, 18..27 from 4
    6: (-1, 0, 22, 4),
    7: (6, 15, 24, 3),  # its donor is in a later shard
    8: (7, 9, 16, 2),  # 7 stores nothing below 15: all 9 rows come from 6
}
SHARDS = [[7, 1, 4], [0, 2, 3], [6, 5, 8]]  # shards hold sequences in the order they finished


def ground_truth(spec=SPEC, seed=0) -> dict[int, tuple[dict, dict]]:
    """sid -> (tokens, acts) of the whole sequence; a follower's first rows are its donor's, exactly."""
    rng = np.random.default_rng(seed)
    out = {}
    for sid, (donor, shared, prompt, generated) in spec.items():
        n = prompt + generated
        tokens = {
            "token_id": rng.integers(0, 1000, n),
            "position": np.arange(n),
            "phase": np.repeat([0, 1], [prompt, generated]),
            "segment": np.concatenate([rng.integers(0, 4, prompt), np.full(generated, 4)]),
            "example": rng.integers(-1, 3, n),
            "row": rng.integers(-1, 30, n),
            "col": rng.integers(-1, 30, n),
        }
        tokens = {k: v.astype(TOKEN_COLUMNS[k]) for k, v in tokens.items()}
        acts = {h: rng.standard_normal((n, w)).astype(np.float32) for h, w in HOOKS.items()}  # [n, w]
        if shared > 0:  # same tokens at the same positions: by causality, the same activations
            donor_tokens, donor_acts = out[donor]
            for cols, lent in ((tokens, donor_tokens), (acts, donor_acts)):
                for k in cols:
                    cols[k][:shared] = lent[k][:shared]
        out[sid] = (tokens, acts)
    return out


def write_store(root, truth, spec=SPEC, shards=SHARDS, sharing=True, stored_from=None, first_shard=0):
    """One shard per list of `shards`. sharing: followers store rows [shared:] and the two columns.
    stored_from: sid -> the first row a sequence stores instead (to write inconsistent stores)."""
    sw = ShardWriter(root, HOOKS, storage_dtype="bfloat16", chunk_bytes=512, fsync=False)
    for k, sids in enumerate(shards):
        records = []
        for sid in sids:
            donor, shared, prompt, generated = spec[sid]
            meta = {"sequence_id": sid, "prompt_length": prompt, "generated_length": generated}
            if sharing and shared > 0:
                meta |= {"prompt_sequence_id": donor, "shared_prompt_length": shared}
            start = (stored_from or {}).get(sid, shared if sharing else 0)
            tokens, acts = truth[sid]
            sliced = SequenceRecord(
                meta, {c: v[start:] for c, v in tokens.items()}, {h: a[start:] for h, a in acts.items()}
            )
            records.append(sw.prepare_record(sliced))
        sw.write(first_shard + k, records)
    write_run_metadata(root, {"hooks": HOOKS})
    return root


@pytest.fixture(scope="module")
def truth():
    return ground_truth()


def write_version_2(root, truth, **kw):
    """As harvest wrote stores before shared prompts: format version 2, no sharing columns at all."""
    sharing = ("prompt_sequence_id", "shared_prompt_length")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(shard_module, "SEQUENCE_COLUMNS", {k: v for k, v in SEQUENCE_COLUMNS.items() if k not in sharing})
        m.setattr(shard_module, "FORMAT_VERSION", 2)
        return write_store(root, truth, sharing=False, **kw)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, truth):
    full = write_version_2(tmp_path_factory.mktemp("full"), truth)
    shared = write_store(tmp_path_factory.mktemp("shared"), truth)
    return open_store(full), open_store(shared)


def expected(truth, sid: int) -> dict[str, np.ndarray]:
    """What sequence(sid) returns: the whole sequence, as the reader's dtypes have it."""
    tokens, acts = truth[sid]
    n = len(tokens["position"])
    derived = {"sequence": np.full(n, sid, np.int64), "first_token": tokens["position"] == 0}
    return tokens | derived | {h: a.astype(ml_dtypes.bfloat16) for h, a in acts.items()}


@pytest.fixture
def copy(stores, tmp_path):
    return shutil.copytree(stores[1].root, tmp_path / "run")


def stored_rows(sid: int) -> int:
    _, shared, prompt, generated = SPEC[sid]
    return prompt + generated - max(shared, 0)


def test_every_sequence_reads_whole(stores, truth):
    for sid in SPEC:
        assert_same(stores[1].sequence(sid), expected(truth, sid), f"sequence {sid}")


def test_stored_rows_are_read_once(stores):
    _, shared = stores
    t = shared.sequences
    assert np.array_equal(t["token_count"], [stored_rows(s) for s in t["sequence_id"]])  # rows stored
    assert np.array_equal(t["prompt_length"], [SPEC[s][2] for s in t["sequence_id"]])  # the full prompt
    assert np.array_equal(t["shared_prompt_length"], [SPEC[s][1] or -1 for s in t["sequence_id"]])
    assert shared.num_tokens == sum(stored_rows(s) for s in SPEC) == len(shared.activations(HA))
    ids, counts = np.unique(shared.tokens("sequence"), return_counts=True)
    assert dict(zip(ids.tolist(), counts.tolist())) == {s: stored_rows(s) for s in SPEC if stored_rows(s)}
    batches = np.concatenate(list(shared.batches(HB, 5, shuffle=False, exclude=())))  # the training loader
    assert len(batches) == shared.num_tokens
    assert np.array_equal(np.asarray(batches), np.asarray(shared.activations(HB)[:]))


def test_a_store_without_sharing_reads_as_before(stores, truth):
    """A version-2 store (no sharing columns at all) reads every sequence whole, and verifies clean."""
    full = stores[0]
    assert "shared_prompt_length" not in full.sequences and {c["format_version"] for c in full.commits} == {2}
    for sid in SPEC:
        assert_same(full.sequence(sid), expected(truth, sid), f"sequence {sid}")
    assert verify_run(full.root, deep=True).ok


def test_a_donor_in_a_version_2_shard(tmp_path, truth):
    """A version-2 run resumed by a version-3 harvest: the donor's shard has no sharing columns."""
    write_version_2(tmp_path / "run", truth, shards=[[0]])
    store = open_store(write_store(tmp_path / "run", truth, shards=[[3]], first_shard=1))  # 3 shares 12 rows with 0
    assert [c["format_version"] for c in store.commits] == [2, 3]
    assert_same(store.sequence(3), expected(truth, 3))
    assert verify_run(store.root, deep=True).ok


def test_verify_passes_a_sharing_store(stores):
    report = verify_run(stores[1].root, deep=True)
    assert report.ok, [f.line() for f in report.findings]


def test_missing_donor_is_one_line_and_unfinished(copy, capsys):
    """The donors' shard 1 (sequences 0, 2, 3) is not committed yet: a crash before its commit record,
    or another process of the run still writing it."""
    (copy / "commits/000001.json").unlink()
    store = open_store(copy)
    with pytest.raises(StoreError) as e:
        store.sequence(4)
    assert str(e.value) == (
        f"sequence 4 shares its first 18 prompt rows with sequence 3, which is not committed in {copy}; "
        f"finish the run (re-run the same harvest command) and read again"
    )
    with pytest.raises(StoreError) as e:
        store.sequence(5)  # 5 -> 4 -> 3: the link that breaks is named, and who needed it
    assert str(e.value) == (
        f"sequence 4 shares its first 18 prompt rows with sequence 3, which is not committed in {copy} "
        f"(sequence 5 reads its prompt through sequence 4); finish the run (re-run the same harvest command) "
        f"and read again"
    )
    assert store.sequence(8)[HA].shape == (18, 8)  # its chain (8 -> 7 -> 6) is committed
    assert store.num_tokens == sum(stored_rows(s) for s in SPEC if s not in (0, 2, 3))  # stored rows still load

    report = verify_run(copy)
    assert sorted(f.kind for f in report.findings) == ["orphan", "unfinished"]
    assert [f.line() for f in report.findings if f.kind == "unfinished"] == [
        "unfinished: shards/000000.zarr: sequence 1 shares its first 20 prompt rows with sequence 0, which is not "
        "committed (and 1 more of its sequences): the run is unfinished; run the same harvest command again"
    ]
    assert report.damaged_shards() == []
    assert main(["verify", str(copy)]) == 1
    capsys.readouterr()
    assert main(["verify", str(copy), "--repair"]) == 1  # nothing to move: the run must be finished
    out = capsys.readouterr().out
    assert "repair: removed shards/000001.zarr" in out  # the uncommitted shard, as a resume removes it
    assert "the run is unfinished: run the same harvest command again" in out
    assert sorted(p.name for p in (copy / "commits").iterdir()) == ["000000.json", "000002.json"]
    assert not (copy / "quarantine").exists() and open_store(copy).num_sequences == 6


def _bad_store(root, truth, case):
    spec, stored_from = dict(SPEC), {}
    if case == "longer than the donor's prompt":
        spec[3] = (0, 21, 25, 4)
    elif case == "longer than its own prompt":
        spec[3] = (0, 26, 25, 4)
    elif case == "a later donor":
        spec[3] = (4, 12, 25, 4)
    elif case == "rows from the wrong position":
        stored_from[3] = 10  # says it shares 12 rows but stores from position 10
    return write_store(root, truth, spec, [[0, 3, 4]], stored_from=stored_from)


BAD = {
    "longer than the donor's prompt": (
        "shared-prompt: shards/000000.zarr/sequences: sequence 3 shares its first 21 prompt rows with sequence 0, "
        "whose prompt has 20",
        "sequence 3 shares 21 prompt rows with sequence 0, whose prompt has 20",
    ),
    "longer than its own prompt": (
        "shared-prompt: shards/000000.zarr/sequences: sequence 3 shares its first 26 prompt rows, but its prompt "
        "has 25",
        "it shares 26 prompt rows of a 25-token prompt",
    ),
    "a later donor": (
        "shared-prompt: shards/000000.zarr/sequences: sequence 3 shares its first 12 prompt rows with sequence 4: "
        "a donor is an earlier sequence",
        "sequence 3 names sequence 4 as its prompt's donor",
    ),
    "rows from the wrong position": (
        "shared-prompt: shards/000000.zarr/position/c/0: sequence 3 shares 12 prompt rows, so it should store its "
        "prompt positions 12..24 first; its first stored row is position 10, 19 rows in all",
        "its prompt row 12 reads back at position 10",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_inconsistent_sharing_is_found_and_never_read(tmp_path, truth, capsys, case):
    root = _bad_store(tmp_path / "run", truth, case)
    finding, why = BAD[case]
    deep_only = case == "rows from the wrong position"
    assert verify_run(root).ok == deep_only  # the tables alone cannot see stored positions
    report = verify_run(root, deep=True)
    assert [f.line() for f in report.findings] == [finding] and report.damaged_shards() == []
    with pytest.raises(StoreError) as e:
        open_store(root).sequence(3)
    assert str(e.value) == (
        f"{root}: sequence 3 cannot be rebuilt from its shared prompt: {why}; run `harvest verify --deep {root}`"
    )
    assert main(["verify", str(root), "--deep", "--repair"]) == 1
    assert "--repair leaves them" in capsys.readouterr().out
    assert [p.name for p in StoreLayout(root).commits_dir.iterdir()] == ["000000.json"]
    assert not (root / "quarantine").exists()


def test_a_donor_that_stores_too_few_rows_is_refused(tmp_path, truth):
    """The donor's table says its prompt holds the rows, but it stores fewer: never read past them."""
    root = write_store(tmp_path / "run", truth, SPEC, [[0, 3]], stored_from={0: 15})  # 0 stores from row 15
    with pytest.raises(StoreError, match="sequence 0 stores 10 rows, not its prompt rows 0..11"):
        open_store(root).sequence(3)
