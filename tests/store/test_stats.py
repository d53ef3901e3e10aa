"""Streaming statistics (harvest.store.stats via Store.stats) against numpy on the full array; the cache."""

import json
import shutil

import numpy as np
import pytest

from harvest.data import open_store
from harvest.store import stats
from harvest.store.format import PHASES, TOKEN_COLUMNS
from harvest.store.shard import SequenceRecord, ShardWriter
from harvest.store.stats import GROUPS, QUANTILES, Moments, compute_stats
from helpers.stores import HA, HB, PLANTED, make_store


@pytest.fixture()
def root(tmp_path):
    return make_store(tmp_path / "run", dtype="bfloat16", widths=(32, 48), chunk_bytes=1024)


def test_moments_merge_is_exact_and_stable():
    rng = np.random.default_rng(0)
    x = 1e6 + rng.standard_normal((1000, 5))  # a large offset breaks the naive sum-of-squares formula
    n = np.linalg.norm(x, axis=1)
    acc = Moments.empty(5)
    for a, b in [(0, 1), (1, 300), (300, 301), (301, 1000)]:
        acc = acc.merge(Moments.of(x[a:b], n[a:b]))
    assert acc.count == 1000
    np.testing.assert_allclose(acc.mean, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(acc.m2 / acc.count, x.var(0), rtol=1e-9)
    np.testing.assert_allclose(acc.norm_sum, n.sum(), rtol=1e-14)


def test_statistics_equal_numpy_on_the_full_array(root):
    s = open_store(root)
    phase, first = s.tokens("phase"), s.tokens("first_token")
    for hook in (HA, HB):
        x = np.asarray(s.activations(hook)[:]).astype(np.float64)  # [N, d]
        norms = np.linalg.norm(x, axis=1)
        st = s.stats(hook)
        np.testing.assert_allclose(st.norms(), norms, rtol=1e-6)
        for g in GROUPS:
            m = ~first & ((phase == PHASES[g]) if g != "all" else True)
            got = st.group(g)
            assert got.count == m.sum() > 0
            np.testing.assert_allclose(got.mean, x[m].mean(0), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(got.var, x[m].var(0), rtol=1e-10)
            np.testing.assert_allclose(got.mean_norm, norms[m].mean(), rtol=1e-6)
            np.testing.assert_allclose(got.scale_factor, np.sqrt(x.shape[1]) / norms[m].mean(), rtol=1e-6)
            np.testing.assert_allclose(got.median_norm, np.median(norms[m]), rtol=1e-6)
            np.testing.assert_allclose(
                [got.quantiles[f"q{q}"] for q in QUANTILES], np.quantile(norms[m], QUANTILES), rtol=1e-6
            )
        med = st.group("all").median_norm
        assert st.first_token["count"] == first.sum()
        np.testing.assert_allclose(st.first_token["median_norm"], np.median(norms[first]), rtol=1e-6)
        assert 20 < st.first_token["median_ratio"] < 80  # the planted 50x sinks
        # the planted 100x rows lead the outlier report, with their provenance
        top = st.outliers[:2]
        assert {(o["sequence"], o["position"]) for o in top} == {(5, p) for p in PLANTED}
        assert all(o["ratio"] > 50 and not first[o["index"]] for o in top)
        assert st.over_factor["count"] == 2 and st.over_factor["first_token"] == first.sum()
        assert np.array_equal(st.outlier_mask(10), norms > 10 * med)


def test_cache_is_written_reused_and_invalidated(root):
    s = open_store(root)
    st = s.stats(HA)
    files = sorted(p.name for p in (root / "stats").iterdir())
    assert files == [f"{HA}.json", f"{HA}.norms.npy", f"{HA}.npz"]
    doc = json.loads((root / "stats" / f"{HA}.json").read_text())
    assert doc["groups"]["all"]["scale_factor"] == st.group("all").scale_factor
    # a fresh Store reads the cache (identical values) instead of recomputing
    s2 = open_store(root)
    cached = s2.stats(HA)
    assert cached.norms_path is not None and cached.norms_array is None
    np.testing.assert_array_equal(cached.group("decode").var, st.group("decode").var)
    np.testing.assert_array_equal(cached.norms(), st.norms())
    assert cached.outliers == st.outliers
    # a new committed shard changes the fingerprint: recomputed over all shards
    n_before = s2.num_tokens
    extra = make_store(
        root.parent / "other", shards=1, seqs_per_shard=2, dtype="bfloat16", widths=(32, 48), chunk_bytes=1024, seed=9
    )
    sw = ShardWriter(root, {HA: 32, HB: 48}, storage_dtype="bfloat16", chunk_bytes=1024, fsync=False)
    other = open_store(extra)
    recs = []
    for sid in other.sequences["sequence_id"]:
        seq = other.sequence(int(sid))
        recs.append(
            sw.prepare_record(
                SequenceRecord(
                    {"sequence_id": 1000 + int(sid)}, {k: seq[k] for k in TOKEN_COLUMNS}, {h: seq[h] for h in (HA, HB)}
                )
            )
        )
    sw.write(4, recs)
    s3 = open_store(root)
    assert s3.num_tokens > n_before
    fresh = s3.stats(HA)
    assert len(fresh.norms()) == s3.num_tokens and fresh.group("all").count > st.group("all").count
    # recompute=True ignores the cache; a direct compute writes nothing
    assert open_store(root).stats(HA, recompute=True).group("all").count == fresh.group("all").count
    assert compute_stats(s3, HB).norms_path is None and not (root / "stats" / f"{HB}.json").exists()


def test_all_hooks_and_unknown_hook(root):
    s = open_store(root)
    assert set(s.stats()) == {HA, HB}
    with pytest.raises(KeyError, match="not in store"):
        s.stats("blocks.7.hook_resid_post")
    with pytest.raises(KeyError, match="no statistics group"):
        s.stats(HA).group("train")


def test_cache_respects_options(tmp_path):
    s = open_store(make_store(tmp_path))
    a = s.stats(HA, top_k=3)
    assert len(a.outliers) == 3 and a.over_factor["factor"] == 10.0
    fresh = open_store(s.root)  # another process: only the disk cache
    b = fresh.stats(HA, top_k=5, outlier_factor=2.0)
    assert len(b.outliers) == 5 and b.over_factor["factor"] == 2.0


def test_memo_is_shared_by_batches_and_stats(tmp_path, monkeypatch):
    s = open_store(make_store(tmp_path))
    computed = []
    real = stats.compute_stats
    monkeypatch.setattr(stats, "compute_stats", lambda *a, **kw: computed.append(a[1]) or real(*a, **kw))
    s.batches(HA, 16, normalize="scale")  # the transform reads the statistics when the loader is built
    s.batches(HA, 16, normalize="center", exclude=["first_token", "outliers"])
    assert computed == [HA]
    shutil.rmtree(s.root / "stats")  # from now on only the memo has them
    st = s.stats(HA)
    assert st is s.stats(HA, top_k=20, outlier_factor=10) and computed == [HA] and not (s.root / "stats").exists()
    assert s.stats(HA, top_k=3) is not st and computed == [HA, HA]  # other options, another entry
    assert s.stats(HA, recompute=True) is not st and computed == [HA, HA, HA]
    assert s.stats(HA) is s.stats(HA)  # recompute replaced the entry
    assert open_store(s.root).stats(HA).norms_path is not None and computed == [HA, HA, HA]  # a new store: disk


def test_cache_streams_the_norms_to_disk(tmp_path):
    """Saving the cache never holds a second copy of the norms in memory ([N] float32: 4 GB at 1e9 tokens)."""
    import dataclasses
    import tracemalloc

    s = open_store(make_store(tmp_path / "run", shards=1, seqs_per_shard=2))
    norms = np.arange(4_000_000, dtype=np.float32)  # 16 MB
    st = dataclasses.replace(compute_stats(s, HA), norms_array=norms)
    tracemalloc.start()
    try:
        saved = stats.save_stats(s, st)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < norms.nbytes / 4
    assert saved.norms_array is None and isinstance(saved.norms(), np.memmap)
    np.testing.assert_array_equal(saved.norms(), norms)
    assert sorted(p.name for p in (s.root / "stats").iterdir()) == [f"{HA}.json", f"{HA}.norms.npy", f"{HA}.npz"]
