"""Fixtures of the SAE trainer tests: a store with planted sparse features, configs, one shared training.

The planted store: every token row of hook A is `offset + sum of 3 of F unit features (magnitudes in
[0.5, 1.5]) + small noise`, so a TopK SAE with k = 3 can explain nearly all of its variance and should
find the features; hook B holds the same codes through another dictionary (d = 24), for a transcoder.
First tokens are 30x attention sinks, which training must leave out.
"""

from __future__ import annotations

import numpy as np
import pytest

from harvest.store.shard import SequenceRecord, ShardWriter

HA, HB = "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"
D_A, D_B, F, K = 16, 24, 32, 3


def _unit(rng, n, d):
    w = rng.standard_normal((n, d))
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def make_planted_store(root, shards=2, seqs_per_shard=20, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    feats_a, feats_b = _unit(rng, F, D_A), _unit(rng, F, D_B)  # [F, d]
    offset = 2.0 * _unit(rng, 1, D_A)[0]  # [d_a] a mean for b_dec to find
    sw = ShardWriter(root, {HA: D_A, HB: D_B}, storage_dtype="float32", codec="none", fsync=False)
    sid = 0
    for k in range(shards):
        recs = []
        for _ in range(seqs_per_shard):
            n_pre, n_dec = int(rng.integers(40, 90)), int(rng.integers(5, 20))
            n = n_pre + n_dec
            codes = np.zeros((n, F))
            for i in range(n):
                codes[i, rng.choice(F, K, replace=False)] = rng.uniform(0.5, 1.5, K)
            a = offset + codes @ feats_a + 0.02 * rng.standard_normal((n, D_A))
            b = codes @ feats_b + 0.02 * rng.standard_normal((n, D_B))
            a[0] *= 30  # attention sink
            b[0] *= 30
            tokens = {
                "token_id": rng.integers(0, 1000, n).astype(np.int32),
                "position": np.arange(n, dtype=np.int32),
                "phase": np.repeat(np.int8([0, 1]), [n_pre, n_dec]),
                "segment": np.concatenate([rng.integers(0, 4, n_pre), np.full(n_dec, 4)]).astype(np.int8),
                "example": np.full(n, -1, np.int16),
                "row": np.full(n, -1, np.int16),
                "col": np.full(n, -1, np.int16),
            }
            acts = {HA: a.astype(np.float32), HB: b.astype(np.float32)}
            recs.append(sw.prepare_record(SequenceRecord({"sequence_id": sid}, tokens, acts)))
            sid += 1
        sw.write(k, recs)
    return {"root": root, "features_a": feats_a, "features_b": feats_b, "offset": offset, "hooks": (HA, HB)}


@pytest.fixture(scope="session")
def planted(tmp_path_factory) -> dict:
    return make_planted_store(tmp_path_factory.mktemp("planted"))


def raw_config(store, out, compile_cache=None, **over) -> dict:
    """A small, fast config dict on `store`; over: section__key=value."""
    raw = {
        "data": {"store": str(store), "hook": HA, "eval_fraction": 0.2},
        "sae": {"d_sae": 64, "k": K, "init_tokens": 512},
        "train": {
            "batch_size": 128,
            "steps": 40,
            "lr": 0.01,
            "warmup_steps": 5,
            "log_every": 10,
            "checkpoint_every": 20,
            "dead_tokens": 5000,
        },
        "output": {"path": str(out)},
        "runtime": {"progress": False, "mesh": {"data": 1}, "compile_cache": compile_cache},
    }
    for key, value in over.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return raw


@pytest.fixture(scope="session")
def make_config(tmp_path_factory):
    """make_config(store, out, **over) -> TrainConfig; make_config.raw(...) -> the dict. The configs share
    a persistent XLA cache (also across the subprocesses): equal programs compile once per session."""
    cache = str(tmp_path_factory.mktemp("jax-cache"))

    def make(store, out, **over):
        from harvest.sae.config import from_dict

        return from_dict(raw_config(store, out, cache, **over))

    make.raw = lambda store, out, **over: raw_config(store, out, cache, **over)
    make.cache = cache
    return make


@pytest.fixture(scope="session")
def trained(planted, make_config, tmp_path_factory) -> dict:
    """One TopK SAE trained to convergence on the planted store (shared by the quality and export tests)."""
    from harvest.sae.trainer import train

    out = tmp_path_factory.mktemp("trained")
    cfg = make_config(planted["root"], out, train__steps=600, train__log_every=100, train__checkpoint_every=600)
    return {"summary": train(cfg), "out": out, "cfg": cfg}
