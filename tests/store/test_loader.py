"""Shuffled loader (harvest.store.loader via Store.batches): exactly once, determinism, filters, alignment."""

import re
import threading

import ml_dtypes
import numpy as np
import pytest

from harvest.data import open_store
from harvest.errors import FieldError, HarvestError
from harvest.store.loader import LoaderError
from harvest.store.runfolder import write_run_metadata
from helpers.stores import HA, HB, PLANTED, collect, make_store, rows_of


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return open_store(make_store(tmp_path_factory.mktemp("loader")))


def test_exactly_once_per_epoch_any_process_count(store):
    everything = ~store.tokens("first_token")
    assert len(store.chunk_index(HA)) > 20 and len(store.shards) == 4  # many chunks over several shards
    for P in (1, 2, 3):
        per_epoch = [[], []]
        for p in range(P):
            b, out = collect(store, [HA, HB], 16, epochs=2, process_index=p, process_count=P, seed=7)
            n = b.batches_per_epoch()
            for e in range(2):
                rows = np.concatenate([r for r, _ in out[e * n : (e + 1) * n]])
                assert len(rows) == b.rows_per_epoch
                per_epoch[e].append(rows)
            for r, x in out:  # every hook's rows are the rows reported, in the same order
                assert np.array_equal(rows_of(x[HA]), r) and np.array_equal(rows_of(x[HB]), r)
                assert np.array_equal(np.rint(-x[HB][:, 1] * 1e3).astype(np.int64), r)
        for e in range(2):
            allrows = np.concatenate(per_epoch[e])
            assert np.array_equal(np.sort(allrows), np.flatnonzero(everything)), (P, e)  # disjoint + complete
            sizes = [len(r) for r in per_epoch[e]]
            assert max(sizes) - min(sizes) <= 1


def test_deterministic_and_shuffled(store):
    def order(**kw):
        return np.concatenate([r for r, _ in collect(store, **kw)[1]])

    a = order(seed=1, epochs=2)
    assert np.array_equal(a, order(seed=1, epochs=2))
    assert not np.array_equal(a, order(seed=2, epochs=2))
    half = len(a) // 2
    assert not np.array_equal(a[:half], a[half:]) and np.array_equal(np.sort(a[:half]), np.sort(a[half:]))
    # rows far apart in the store land in the same batch (chunk-level permutation + mixing buffer)
    first = collect(store, seed=1, buffer_chunks=8)[1][0][0]
    assert np.ptp(first) > store.num_tokens // 4
    plain = order(shuffle=False, exclude=())
    assert np.array_equal(plain, np.arange(store.num_tokens))


def test_single_hook_gives_arrays_and_values(store):
    x = next(iter(store.batches(HA, 32, exclude=())))
    assert isinstance(x, np.ndarray) and x.shape == (32, 8) and x.dtype == np.float32
    d = next(iter(store.batches([HA], 32)))
    assert isinstance(d, dict) and list(d) == [HA]
    for r, x in collect(store, HB, 32, seed=3)[1][:5]:
        assert np.array_equal(x, store.activations(HB)[r])


@pytest.mark.parametrize(
    "kw, want",
    [
        ({"phase": "decode"}, lambda t: (t["phase"] == 1) & ~t["first_token"]),
        ({"phase": "prefill", "exclude": ()}, lambda t: t["phase"] == 0),
        ({"segment": "test_input"}, lambda t: (t["segment"] == 3) & ~t["first_token"]),
        ({"segment": ["example_input", "answer"], "exclude": []}, lambda t: np.isin(t["segment"], [1, 4])),
        ({"exclude": ()}, lambda t: np.ones_like(t["first_token"])),
        ({"exclude": "first_token"}, lambda t: ~t["first_token"]),
        ({"exclude": ["first_token", "outliers"]}, lambda t: ~t["first_token"] & ~t["planted"]),
    ],
)
def test_filters(store, kw, want):
    t = {k: store.tokens(k) for k in ("phase", "segment", "first_token", "sequence", "position")}
    t["planted"] = (t["sequence"] == 5) & np.isin(t["position"], PLANTED)
    assert t["planted"].sum() == 2
    rows = np.concatenate([r for r, _ in collect(store, **kw)[1]])
    assert np.array_equal(np.sort(rows), np.flatnonzero(want(t)))


def test_outlier_factor_and_segment_names(store):
    med = store.stats(HA).group("all").median_norm
    rows = np.concatenate([r for r, _ in collect(store, exclude=["outliers"], outlier_factor=20)[1]])
    norms = store.stats(HA).norms()
    assert set(np.flatnonzero(norms > 20 * med)).isdisjoint(rows) and (norms > 20 * med).sum() >= 2


SEGS = "text, example_input, example_output, test_input, answer"


@pytest.mark.parametrize(
    "hooks, kw, message",
    [
        (HA, {"epochs": 0}, "epochs: 0 is impossible; it must be >= 1, or None to repeat forever"),
        (HA, {"epochs": -2}, "epochs: -2 is impossible; it must be >= 1, or None to repeat forever"),
        (HA, {"batch_size": 0}, "batch_size: 0 is impossible; it must be >= 1"),
        (HA, {"batch_size": -8}, "batch_size: -8 is impossible; it must be >= 1"),
        (HA, {"process_count": 0}, "process_count: 0 is impossible; it must be >= 1"),
        (
            HA,
            {"process_index": 2, "process_count": 2},
            "process_index: 2 is impossible; it must be in [0, process_count=2)",
        ),
        (HA, {"process_index": -1}, "process_index: -1 is impossible; it must be in [0, process_count=1)"),
        (HA, {"buffer_chunks": 0}, "buffer_chunks: 0 is impossible; it must be >= 1"),
        (HA, {"prefetch": 0}, "prefetch: 0 is impossible; it must be >= 1"),
        (HA, {"workers": 0}, "workers: 0 is impossible; it must be >= 1"),
        (HA, {"outlier_factor": 1}, "outlier_factor: 1 is impossible; it must be > 1 (a multiple of the median norm)"),
        (
            HA,
            {"outlier_factor": 0.5},
            "outlier_factor: 0.5 is impossible; it must be > 1 (a multiple of the median norm)",
        ),
        (
            HA,
            {"outlier_factor": float("nan")},
            "outlier_factor: nan is impossible; it must be > 1 (a multiple of the median norm)",
        ),
        (HA, {"phase": "generate"}, "phase: 'generate' is not one of prefill, decode, None"),
        (HA, {"segment": "test_output"}, f"segment: 'test_output' is not one of this run's segments: {SEGS}"),
        (HA, {"segment": ["answer", "grid"]}, f"segment: 'grid' is not one of this run's segments: {SEGS}"),
        (HA, {"exclude": ["first_token", "sinks"]}, "exclude: 'sinks' is not one of first_token, outliers"),
        (HA, {"normalize": "zscore"}, "normalize: 'zscore' is not one of scale, center, None"),
        ([], {}, "hooks: none given; pass a hook name or a list of hook names"),
        ([HA, HB, HA], {}, f"hooks: {HA!r} repeated; give each hook once"),
        (
            "blocks.9.hook_resid_post",
            {},
            f"hooks: hook 'blocks.9.hook_resid_post' not in store; hooks: {HA}, {HB}",
        ),
        (
            [HA, "blocks.9.hook_resid_post"],
            {"exclude": ["outliers"]},
            f"hooks: hook 'blocks.9.hook_resid_post' not in store; hooks: {HA}, {HB}",
        ),
    ],
)
def test_impossible_options_are_refused_when_built(store, hooks, kw, message):
    with pytest.raises(FieldError, match=f"^{re.escape(message)}$") as e:
        store.batches(hooks, kw.pop("batch_size", 8), **kw)
    assert isinstance(e.value, HarvestError) and isinstance(e.value, ValueError)
    assert e.value.field == message.split(":")[0]


def test_empty_selection_is_refused(store):
    n = f"{store.num_tokens:,}"
    # prefill tokens are never in the answer segment (helpers/stores.py)
    with pytest.raises(LoaderError) as e:
        store.batches(HA, 8, phase="prefill", segment="answer")
    assert str(e.value) == (
        f"no rows match phase='prefill', segment=('answer',), exclude=('first_token',) in {store.root} "
        f"({n} rows before filtering); loosen the filters"
    )
    assert isinstance(e.value, HarvestError) and isinstance(e.value, ValueError)
    with pytest.raises(LoaderError, match=re.escape("segment=(), exclude=('first_token',) in")):
        store.batches(HA, 8, segment=[])


def test_empty_store_is_refused(tmp_path):
    write_run_metadata(tmp_path, {})  # a harvest that has started but committed no shard yet
    s = open_store(tmp_path)
    for kw in ({}, {"exclude": ()}):  # exclude=() reads no token column: still refused
        with pytest.raises(LoaderError, match=f"^{re.escape(str(tmp_path))} has no committed shards; there is"):
            s.batches(HA, 8, **kw)


def test_a_process_without_batches_is_refused(store):
    S = int((~store.tokens("first_token")).sum())
    B = S // 3 + 1  # every process gets S // 3 rows: not one full batch
    with pytest.raises(LoaderError) as e:
        store.batches(HA, B, drop_last=True, process_index=1, process_count=3)
    assert str(e.value) == (
        f"process_index=1 of process_count=3 gets {S // 3:,} of the {S:,} selected rows per epoch, fewer than "
        f"batch_size={B}, so drop_last=True leaves it no batch; lower batch_size or process_count"
    )
    assert len(store.batches(HA, B - 1, drop_last=True, process_index=1, process_count=3)) == 1  # just enough
    # more processes than rows: the first ones get none, even without drop_last (or epochs=None would spin)
    with pytest.raises(LoaderError) as e:
        store.batches(HA, 8, process_index=0, process_count=S + 1, epochs=None)
    assert str(e.value) == (
        f"process_index=0 of process_count={S + 1} gets none of the {S:,} selected rows per epoch; "
        "lower process_count or loosen the filters"
    )
    assert len(store.batches(HA, 8, process_index=S, process_count=S + 1)) == 1


def test_drop_last_gives_equal_full_batches(store):
    counts = []
    for p in range(3):
        b, out = collect(store, HA, 24, drop_last=True, process_index=p, process_count=3, epochs=2)
        assert all(len(r) == 24 for r, _ in out)
        counts.append(len(out))
    assert len(set(counts)) == 1 and counts[0] == 2 * ((~store.tokens("first_token")).sum() // 3 // 24)


def test_bfloat16_dtype_and_normalisation(tmp_path):
    s = open_store(make_store(tmp_path, dtype="bfloat16", widths=(64, 32)))
    x = np.concatenate(list(s.batches(HA, 50)))
    assert x.dtype == ml_dtypes.bfloat16
    assert next(iter(s.batches(HA, 50, dtype="float32"))).dtype == np.float32
    scaled = np.concatenate(list(s.batches(HA, 50, normalize=True)))
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(scaled.astype(np.float64), axis=1).mean(), np.sqrt(64), rtol=1e-3)
    assert len(scaled) == len(x) and np.isfinite(scaled).all()
    centered = np.concatenate(list(s.batches(HA, 50, normalize="center"))).astype(np.float64)
    np.testing.assert_allclose(centered.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose((centered**2).sum(1).mean(), 64, rtol=1e-3)
    dec = np.concatenate(list(s.batches(HA, 50, normalize="center", phase="decode"))).astype(np.float64)
    np.testing.assert_allclose(dec.mean(0), 0, atol=1e-3)  # the phase's own statistics


def test_early_break_stops_the_thread(store):
    before = threading.active_count()
    for _ in range(3):
        for _x in store.batches(HA, 4, prefetch=1, buffer_chunks=2):
            break
    assert threading.active_count() <= before
    with pytest.raises(TypeError):
        len(store.batches(HA, 4, epochs=None))
    it = iter(store.batches(HA, 4, epochs=None))
    assert len([next(it) for _ in range(500)]) == 500  # endless: keeps going past one epoch
    it.close()
