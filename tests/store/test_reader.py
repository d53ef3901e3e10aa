"""Read API (harvest.data.open_store)."""

import ml_dtypes
import numpy as np
import pytest

from harvest.data import open_store
from harvest.store.runfolder import StoreError, write_run_metadata
from harvest.store.shard import ShardWriter
from helpers.fake_records import HOOKS, fake_record

H0, H1 = list(HOOKS)
BF16 = ml_dtypes.bfloat16


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """3 shards with sequences of different lengths; shard 1 has an extra column."""
    root = tmp_path_factory.mktemp("run")
    sw = ShardWriter(root, HOOKS, storage_dtype="bfloat16", fsync=False)
    layout = [[0, 1, 2], [3, 4], [5]]
    for i, sids in enumerate(layout):
        extra = (lambda s: {"score": s * 1.5}) if i == 1 else (lambda s: {})
        recs = [fake_record(s, n_prefill=5 + s, n_decode=s % 3, extra=extra(s)) for s in sids]
        sw.write(i, [sw.prepare_record(r) for r in recs])
    write_run_metadata(root, {"config": {"capture": {"hooks": list(HOOKS)}}})
    return root


def _want(sid):
    return fake_record(sid, n_prefill=5 + sid, n_decode=sid % 3)


def _all(name):  # the expected [N] token column / [N, d] activations, in global order
    recs = [_want(s) for s in range(6)]
    if name in HOOKS:
        return np.concatenate([r.acts[name] for r in recs]).astype(BF16)
    return np.concatenate([r.tokens[name] for r in recs])


def test_summary(run):
    s = open_store(run)
    assert s.hooks == list(HOOKS) and s.num_sequences == 6
    assert s.num_tokens == sum(5 + i + i % 3 for i in range(6))
    assert s.metadata["config"]["capture"]["hooks"] == list(HOOKS)
    assert s.storage_dtype == "bfloat16" and "shards=3" in repr(s)


def test_sequence_table(run):
    s = open_store(run)
    t = s.sequences
    assert len(t) == 6 and list(t["sequence_id"]) == list(range(6))
    assert t["task_id"].dtype == object and t["task_id"][3] == "task003"
    assert t["generated_text"][2] == "out é 2\n[[1, 2]]"
    assert t["augmentation"][1] == '{"perm": [1, 0], "rot": 1}'
    assert t["correct"].dtype == np.bool_ and t["pixel_accuracy"].dtype == np.float64
    # token_offset is global: it indexes activations() and tokens()
    pos = s.tokens("position")
    assert all(pos[o] == 0 for o in t["token_offset"])
    assert np.array_equal(t["token_count"], [5 + i + i % 3 for i in range(6)])
    # a column only shard 1 has is filled elsewhere
    assert np.isnan(t["score"][[0, 1, 2, 5]]).all() and list(t["score"][3:5]) == [4.5, 6.0]


def test_to_pandas(run):
    pytest.importorskip("pandas")
    df = open_store(run).sequences.to_pandas()
    assert df.shape[0] == 6 and df.loc[4, "task_id"] == "task004"


def test_sequence(run):
    s = open_store(run)
    for sid in (0, 4, 5):
        got, want = s.sequence(sid), _want(sid)
        for name, col in want.tokens.items():
            assert np.array_equal(got[name], col), name
        assert np.all(got["sequence"] == sid)
        assert list(got["first_token"]) == [True] + [False] * (len(col) - 1)
        for h in HOOKS:
            assert got[h].dtype == BF16 and got[h].shape == want.acts[h].shape
            assert np.array_equal(got[h], want.acts[h].astype(BF16))
    with pytest.raises(KeyError):
        s.sequence(99)


def test_tokens(run):
    s = open_store(run)
    for name in ("token_id", "position", "phase", "segment", "example", "row", "col"):
        assert np.array_equal(s.tokens(name), _all(name))
    assert s.tokens("sequence").dtype == np.int64 and s.tokens("first_token").sum() == 6
    assert s.tokens("phase").dtype == np.int8


def test_activation_view_indexing(run):
    s = open_store(run)
    v, want = s.activations(H1), _all(H1)
    n = s.num_tokens
    assert v.shape == (n, HOOKS[H1]) and len(v) == n and v.dtype == BF16
    assert np.array_equal(v[:], want)
    for a, b in [(0, 1), (3, 40), (17, 18), (n - 5, n), (10, 10), (30, 2 * n)]:
        assert np.array_equal(v[a:b], want[a:b]), (a, b)
    assert np.array_equal(v[::7], want[::7]) and np.array_equal(v[-1], want[-1])
    assert np.array_equal(v[5], want[5])
    idx = np.array([40, 3, 3, n - 1, 0, -2])  # unsorted, duplicated, negative
    assert np.array_equal(v[idx], want[idx])
    mask = s.tokens("phase") == 1
    assert np.array_equal(v[mask], want[mask])
    assert np.array_equal(v[2:30, 3:9], want[2:30, 3:9])
    assert v[np.array([], dtype=int)].shape == (0, HOOKS[H1])
    f32 = s.activations(H0, dtype=np.float32)
    assert f32[:4].dtype == np.float32 and np.array_equal(f32[:4], _all(H0)[:4].astype(np.float32))
    assert np.array_equal(np.asarray(v), want)
    with pytest.raises(IndexError):
        v[n]
    with pytest.raises(KeyError, match="not in store"):
        s.activations("blocks.9.hook_resid_pre")


def test_chunk_index_covers_every_row_once(tmp_path):
    hooks = {"h": 1024}
    sw = ShardWriter(tmp_path, hooks, fsync=False, chunk_bytes=64 << 10)  # 32-row chunks
    sw.write(0, [sw.prepare_record(fake_record(0, n_prefill=70, hooks=hooks))])
    sw.write(1, [sw.prepare_record(fake_record(1, n_prefill=40, hooks=hooks))])
    s = open_store(tmp_path)
    refs = s.chunk_index("h")
    assert [(r.shard, r.start, r.stop) for r in refs] == [(0, 0, 32), (0, 32, 64), (0, 64, 75), (1, 0, 32), (1, 32, 45)]
    rows = np.concatenate([np.arange(r.offset + r.start, r.offset + r.stop) for r in refs])
    assert np.array_equal(rows, np.arange(s.num_tokens))
    got = np.concatenate([s.read_rows("h", r.shard, r.start, r.stop) for r in refs])
    assert np.array_equal(got, s.activations("h")[:])


def test_empty_and_missing_store(tmp_path):
    (tmp_path / "commits").mkdir()  # a run that has committed nothing yet
    s = open_store(tmp_path)
    assert s.num_tokens == 0 and s.num_sequences == 0 and s.hooks == [] and s.metadata == {}
    assert len(s.sequences) == 0
    with pytest.raises(StoreError):
        s.tokens("phase")
    with pytest.raises(FileNotFoundError):
        open_store(tmp_path / "missing")


def test_token_column_is_shared_and_read_only(run):
    s = open_store(run)
    col = s.token_column("position")  # [N]
    assert col is s.token_column("position") and not col.flags.writeable
    assert np.array_equal(col, s.tokens("position")) and np.array_equal(col, _all("position"))
    with pytest.raises(ValueError):
        col[0] = 7
    copy = s.tokens("position")  # tokens() stays a private copy the caller may change
    copy[0] = 7
    assert copy.flags.writeable and s.token_column("position")[0] == 0


def test_hook_dtype_and_check_hook(run, tmp_path):
    s = open_store(run)
    assert s.hook_dtype(H0) == BF16 and s.hook_dtype(H1) == BF16
    assert s.hook_dtype(H0) == s.read_rows(H0, 0, 0, 0).dtype == s.activations(H0).dtype
    sw = ShardWriter(tmp_path, HOOKS, storage_dtype="float32", fsync=False)
    sw.write(0, [sw.prepare_record(fake_record(0))])
    f32 = open_store(tmp_path)
    assert f32.hook_dtype(H0) == np.float32 and f32.read_rows(H0, 0, 0, 2).dtype == np.float32
    s.check_hook(H1)  # a known hook passes
    want = f"hook 'blocks.9.x' not in store; hooks: {H0}, {H1}"
    for call in (s.check_hook, s.hook_dtype, s.activations, s.chunk_index):
        with pytest.raises(KeyError) as e:
            call("blocks.9.x")
        assert e.value.args[0] == want, call


def test_shard_starts_and_array(run):
    s = open_store(run)
    # sequences of 5, 7, 9 | 8, 10 | 12 tokens
    assert list(s.shard_starts) == [sh.offset for sh in s.shards] == [0, 21, 39]
    assert not s.shard_starts.flags.writeable
    a = s.array(1, f"acts/{H0}")
    assert a is s.array(1, f"acts/{H0}") and a.shape == (s.shards[1].num_tokens, HOOKS[H0])
    assert np.array_equal(s.array(2, "position")[...], s.sequence(5)["position"])


def test_memo_computes_once_per_store(run):
    s, calls = open_store(run), []

    def compute():
        calls.append(1)
        return len(calls)

    assert s.memo(("test", 1), compute) == 1 and s.memo(("test", 1), compute) == 1
    assert s.memo(("test", 2), compute) == 2  # another key
    assert s.memo(("test", 1), compute, refresh=True) == 3 and s.memo(("test", 1), compute) == 3
    assert open_store(run).memo(("test", 1), compute) == 4  # one memo per open store
