"""Other Zarr v3 readers open harvest shards: xarray (labelled, through the `dimension_names` every array
carries) and TensorStore's zarr3 driver, with the values harvest's own reader returns, bit for bit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from harvest.data import open_store
from harvest.store.format import TOKEN_COLUMNS
from helpers.stores import HA, HB, make_store

xr = pytest.importorskip("xarray")
ts = pytest.importorskip("tensorstore")

TOKEN_NAMES = [*TOKEN_COLUMNS, "sequence", "first_token"]
FEATURE_DIM = {HA: "d_model", HB: "d_mlp"}  # HA is a residual hook, HB an mlp.hook_post


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def store(request, tmp_path_factory):
    # chunk_bytes=256: several inner chunks per activation array, so the shard index matters
    root = make_store(tmp_path_factory.mktemp(request.param), shards=2, seqs_per_shard=3, dtype=request.param)
    return open_store(root)


def bits(x: np.ndarray) -> np.ndarray:
    """The raw bits of an array (bfloat16 stores keep uint16 bits on disk, and NaN != NaN)."""
    x = np.ascontiguousarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}")) if x.dtype.kind in "fV" else x


def test_xarray_opens_a_shard_with_labelled_dimensions(store):
    for sh in store.shards:
        rows = slice(sh.offset, sh.offset + sh.num_tokens)
        ds = xr.open_zarr(sh.path, consolidated=False)  # the root group: per-token columns
        assert set(ds.data_vars) == set(TOKEN_NAMES)
        assert dict(ds.sizes) == {"token": sh.num_tokens}
        for name in TOKEN_NAMES:
            assert ds[name].dims == ("token",)
            np.testing.assert_array_equal(ds[name].values, store.tokens(name)[rows])
        assert ds.attrs["num_tokens"] == sh.num_tokens

        acts = xr.open_dataset(sh.path, engine="zarr", group="acts", consolidated=False)
        for h in store.hooks:
            assert acts[h].dims == ("token", FEATURE_DIM[h])
            assert acts[h].attrs["logical_dtype"] == store.storage_dtype
            assert np.array_equal(bits(acts[h].values), bits(store.activations(h)[rows]))

        seqs = xr.open_zarr(sh.path, group="sequences", consolidated=False)
        assert dict(seqs.sizes) == {"sequence": len(sh.sequence_ids)}
        assert seqs["sequence_id"].values.tolist() == list(sh.sequence_ids)

        # the whole shard as one tree: the dimension names agree across its groups
        tree = xr.open_datatree(sh.path, engine="zarr", consolidated=False)
        assert tree["acts"].sizes["token"] == tree.sizes["token"] == sh.num_tokens


def _ts_read(path):
    t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}).result()
    return t, t.read().result()


def test_tensorstore_reads_activations_and_token_columns(store):
    for sh in store.shards:
        rows = slice(sh.offset, sh.offset + sh.num_tokens)
        for h in store.hooks:
            t, x = _ts_read(sh.path / "acts" / h)  # [n, d]: uint16 bits for bfloat16 stores
            assert t.domain.labels == ("token", FEATURE_DIM[h])
            assert np.array_equal(bits(x), bits(store.activations(h)[rows]))
        for name in ("position", "sequence", "first_token"):
            t, col = _ts_read(sh.path / name)  # [n]
            assert t.domain.labels == ("token",)
            np.testing.assert_array_equal(col, store.tokens(name)[rows])


def _inner_chunks(array_dir) -> list[tuple[int, int]]:
    """(offset, nbytes) of every inner chunk of an array's one shard object (`c/0/0`): its index is at the
    end, one (offset, nbytes) uint64 pair per inner chunk, then the index's crc32c."""
    meta = json.loads((array_dir / "zarr.json").read_text())
    outer = meta["chunk_grid"]["configuration"]["chunk_shape"]
    inner = meta["codecs"][0]["configuration"]["chunk_shape"]
    k = int(np.prod([o // i for o, i in zip(outer, inner)]))
    data = (array_dir / "c" / "0" / "0").read_bytes()
    idx = np.frombuffer(data[len(data) - 4 - 16 * k : len(data) - 4], dtype="<u8").reshape(k, 2)  # [k, 2]
    return [(int(o), int(b)) for o, b in idx]


def test_tensorstore_refuses_a_flipped_byte_in_an_activation_chunk(store, tmp_path):
    shard = tmp_path / "shard.zarr"
    shutil.copytree(store.shards[0].path, shard)
    target = shard / "acts" / HA / "c" / "0" / "0"
    chunks = _inner_chunks(shard / "acts" / HA)
    assert len(chunks) > 1
    off, nbytes = chunks[1]
    data = bytearray(target.read_bytes())
    data[off + nbytes // 2] ^= 0x04  # inside the compressed data of the second inner chunk
    target.write_bytes(bytes(data))
    t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(shard / "acts" / HA)}}).result()
    with pytest.raises(ValueError, match=r"DATA_LOSS: .*shard entry \{1, 0\}.*Digest mismatch"):
        t.read().result()
    # the crc32c is per inner chunk: the rows of the first chunk still read, and equal harvest's
    inner = t.chunk_layout.read_chunk.shape[0]
    first = t[:inner].read().result()  # [inner, d]
    assert np.array_equal(bits(first), bits(store.activations(HA)[:inner]))
    # the other hook, untouched, still reads
    _, x = _ts_read(shard / "acts" / HB)
    rows = slice(0, store.shards[0].num_tokens)
    assert np.array_equal(bits(x), bits(store.activations(HB)[rows]))
