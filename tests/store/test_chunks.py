"""Direct chunk reads (harvest.store.chunks) equal zarr's, for every codec and for the loader."""

import numpy as np
import pytest

from harvest.data import open_store
from harvest.store import chunks, loader
from helpers.stores import HA, HB, collect, make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return open_store(make_store(tmp_path_factory.mktemp("chunks")))


def test_zarr_fallback_reads_the_same(store, monkeypatch):
    direct = collect(store, [HA, HB], 16, seed=5)[1]
    monkeypatch.setattr(chunks, "_direct", lambda *a: None)
    via_zarr = collect(store, [HA, HB], 16, seed=5)[1]
    for (r1, x1), (r2, x2) in zip(direct, via_zarr, strict=True):
        assert np.array_equal(r1, r2) and all(np.array_equal(x1[h], x2[h]) for h in (HA, HB))


@pytest.mark.parametrize("codec", ["blosc-zstd", "zstd", "none"])
def test_chunk_reader_every_codec(tmp_path, codec, monkeypatch):
    s = open_store(
        make_store(tmp_path, shards=2, seqs_per_shard=3, dtype="bfloat16", codec=codec, widths=(8, 32), chunk_bytes=200)
    )
    reader = chunks.ChunkReader(s, s.hooks)
    assert all(p is not None for p in reader.plans.values())
    assert reader.dtypes == {h: np.uint16 for h in s.hooks}  # bfloat16 moves as its bits
    monkeypatch.setattr(s, "hook_dtype", None)  # looked up once, in __init__: not per chunk
    for unit in loader.read_units(s, s.hooks):  # HB's chunks nest inside HA's units; last chunks are padded
        for h in s.hooks:
            want = s.read_rows(h, unit.shard, unit.start, unit.stop).view(np.uint16)
            assert np.array_equal(reader.read(h, unit), want)


def test_chunk_reader_float32_dtype(store):
    reader = chunks.ChunkReader(store, [HA])
    unit = store.chunk_index(HA)[1]
    x = reader.read(HA, unit)  # [rows, d]
    assert reader.dtype(HA) == np.float32 and x.dtype == np.float32
    assert np.array_equal(x, store.activations(HA)[unit.offset + unit.start : unit.offset + unit.stop])
