"""Synthetic run folders for the store tests: every value says which global row it came from."""

from __future__ import annotations

import numpy as np

from harvest.store.shard import SequenceRecord, ShardWriter

HA, HB = "blocks.0.hook_resid_post", "blocks.0.mlp.hook_post"
PLANTED = (3, 7)  # sequence-local positions of planted outliers in sequence 5 (~100x the median norm)


def make_store(
    root, shards=4, seqs_per_shard=6, dtype="float32", widths=(8, 16), chunk_bytes=256, codec="blosc-zstd", seed=0
):
    """Sequences of random lengths over several shards; column 0 of every hook encodes the global
    row (row * 1e-3; hook B's column 1 is its negative), so a batch says where each row came from.
    First tokens are scaled 50x (attention sinks); two rows of sequence 5 are scaled 100x."""
    rng = np.random.default_rng(seed)
    hooks = {HA: widths[0], HB: widths[1]}
    sw = ShardWriter(root, hooks, storage_dtype=dtype, codec=codec, chunk_bytes=chunk_bytes, fsync=False)
    row = sid = 0
    for k in range(shards):
        recs = []
        for _ in range(seqs_per_shard):
            n_pre, n_dec = int(rng.integers(3, 50)), int(rng.integers(0, 15))
            n = n_pre + n_dec
            rows = np.arange(row, row + n)
            acts = {h: rng.standard_normal((n, w)).astype(np.float32) for h, w in hooks.items()}
            for h in hooks:
                acts[h][0] *= 50
                if sid == 5:
                    acts[h][[p for p in PLANTED if p < n]] *= 100
                acts[h][:, 0] = rows * 1e-3
            acts[HB][:, 1] = -rows * 1e-3
            tokens = {
                "token_id": rng.integers(0, 1000, n).astype(np.int32),
                "position": np.arange(n, dtype=np.int32),
                "phase": np.repeat(np.int8([0, 1]), [n_pre, n_dec]),
                "segment": np.concatenate([rng.integers(0, 4, n_pre), np.full(n_dec, 4)]).astype(np.int8),
                "example": np.full(n, -1, np.int16),
                "row": np.full(n, -1, np.int16),
                "col": np.full(n, -1, np.int16),
            }
            recs.append(sw.prepare_record(SequenceRecord({"sequence_id": sid}, tokens, acts)))
            row, sid = row + n, sid + 1
        sw.write(k, recs)
    return root


def rows_of(x):  # the global rows a batch's values encode
    return np.rint(np.asarray(x, dtype=np.float64)[:, 0] * 1e3).astype(np.int64)


def collect(store, hooks=HA, batch=16, **kw):
    b = store.batches(hooks, batch, with_rows=True, **kw)
    out = list(b)
    assert len(out) == len(b)
    return b, out


def assert_same(a, b, where="") -> None:
    """Two read results (nested dicts and lists of arrays) are equal: keys, lengths, dtypes, shapes, values."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k}]")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        x, y = np.asarray(a), np.asarray(b)
        assert x.dtype == y.dtype and x.shape == y.shape, where
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), where
