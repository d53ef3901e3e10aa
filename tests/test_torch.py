"""harvest.torch: the loader's batches as torch tensors (same rows, same order, exact values), a SAELens
data provider that SAETrainer trains from, and torch staying optional for harvest and harvest.data."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from harvest.data import open_store
from harvest.errors import FieldError
from helpers.stores import HA, HB, make_store

torch = pytest.importorskip("torch")
ht = pytest.importorskip("harvest.torch")

B = 16


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def store(request, tmp_path_factory):
    return open_store(make_store(tmp_path_factory.mktemp(request.param), shards=3, dtype=request.param))


def bits(t) -> np.ndarray:
    """The raw bits of a tensor or array: bit-exact comparisons (bfloat16 included)."""
    if isinstance(t, torch.Tensor):
        t = t.cpu()
        return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
    return t.view(np.int16) if t.dtype == ml_dtypes.bfloat16 else t


def stored(store, hook) -> np.ndarray:
    """[N, d] every activation of a hook, in the store's logical dtype (read once per store)."""
    return store.memo(("test_torch", hook), lambda: store.activations(hook)[:])


def pairs(torch_batches, loader):
    got, want = list(torch_batches), list(loader)
    assert len(got) == len(want) == len(torch_batches) == len(loader)
    return zip(got, want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("hooks", [HA, [HA, HB]], ids=["one hook", "two hooks"])
def test_same_rows_and_values_as_the_loader(store, dtype, hooks):
    tdt = getattr(torch, dtype)
    ndt = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    opts = dict(seed=3, epochs=2, with_rows=True)
    for (rows, x), (want_rows, want) in pairs(
        ht.batches(store, hooks, B, dtype=tdt, **opts), store.batches(hooks, B, dtype=ndt, **opts)
    ):
        np.testing.assert_array_equal(rows, want_rows)
        xs, wants = (x, want) if isinstance(hooks, list) else ({HA: x}, {HA: want})
        assert list(xs) == list(wants) == ([HA, HB] if isinstance(hooks, list) else [HA])
        for h, t in xs.items():
            assert isinstance(t, torch.Tensor) and t.dtype == tdt and t.device.type == "cpu"
            assert t.shape == (len(rows), store.hook_widths[h])  # [B, d] (the last batch may be short)
            assert np.array_equal(bits(t), bits(wants[h]))
            # and the store's own values: bf16 -> float32 is exact, a bf16 tensor has the stored bits
            assert np.array_equal(bits(t), bits(stored(store, h)[rows].astype(ndt)))  # [B, d]


def test_bfloat16_tensors_hold_the_stored_bits(store):
    # from a bfloat16 store: no float round trip; from a float32 store: numpy's round-to-nearest-even
    for rows, t in ht.batches(store, HA, B, dtype=torch.bfloat16, with_rows=True):
        x = stored(store, HA)[rows]  # [B, d]
        want = x.view(np.int16) if store.storage_dtype == "bfloat16" else x.astype(ml_dtypes.bfloat16)
        assert np.array_equal(t.view(torch.int16).numpy(), bits(want))
        # torch's own bf16 -> float32 agrees with numpy's: the tensor is a real bfloat16 tensor
        assert np.array_equal(t.float().numpy(), np.asarray(want.view(ml_dtypes.bfloat16), np.float32))


def test_loader_options_pass_through(store):
    def rows(**kw):
        return np.concatenate([r for r, _ in ht.batches(store, HA, B, with_rows=True, **kw)])

    a, b = rows(seed=0), rows(seed=1)
    assert sorted(a) == sorted(b) and not np.array_equal(a, b)  # the same rows, in another order
    np.testing.assert_array_equal(a, rows(seed=0))
    phase = store.tokens("phase")
    decode = rows(phase="decode")
    assert len(decode) == int((phase == 1).sum()) and (phase[decode] == 1).all()
    assert not store.tokens("first_token")[a].any()  # the default exclude
    assert store.tokens("first_token")[rows(exclude=())].sum() == store.num_sequences
    halves = [rows(process_index=p, process_count=2) for p in (0, 1)]
    assert sorted(np.concatenate(halves)) == sorted(a)
    tb = ht.batches(store, HA, B, phase="decode", drop_last=True)
    assert len(tb) == len(store.batches(HA, B, phase="decode", drop_last=True)) == tb.batches_per_epoch()
    assert all(x.shape == (B, store.hook_widths[HA]) for x in tb)
    normalized = [x for x in ht.batches(store, HA, B, normalize="scale", shuffle=False)]
    want = list(store.batches(HA, B, normalize="scale", shuffle=False))
    assert all(np.array_equal(x.numpy(), w) for x, w in zip(normalized, want))


def test_refusals_are_one_line_field_errors(store):
    with pytest.raises(FieldError, match=r"^dtype: torch.int32 is not one of"):
        ht.batches(store, HA, B, dtype=torch.int32)
    with pytest.raises(FieldError, match=r"^pin_memory: True only helps copies to a CUDA device; device is 'cpu'$"):
        ht.batches(store, HA, B, pin_memory=True)
    with pytest.raises(FieldError, match=r"^hooks: "):  # the loader's own checks, before any read
        ht.batches(store, "blocks.9.hook_resid_post", B)
    with pytest.raises(FieldError, match=r"^with_rows: "):
        ht.TorchDataProvider(store, HA, B, with_rows=True)


def test_data_provider_is_endless_and_yields_full_batches(store):
    per_epoch = store.batches(HA, B, drop_last=True).batches_per_epoch()
    with ht.TorchDataProvider(store, HA, B, seed=5) as provider:
        assert iter(provider) is provider
        xs = [next(provider) for _ in range(2 * per_epoch + 3)]  # past the end of two epochs
        assert provider.steps == len(xs)
    assert all(x.shape == (B, store.hook_widths[HA]) and x.dtype == torch.float32 for x in xs)
    # its first epoch is the loader's first epoch with drop_last=True
    want = list(store.batches(HA, B, seed=5, drop_last=True, dtype="float32"))
    assert all(np.array_equal(x.numpy(), w) for x, w in zip(xs, want))
    with pytest.raises(StopIteration):  # closed: the loader thread is gone
        next(provider)
    with ht.TorchDataProvider(store, [HA, HB], B, dtype=torch.bfloat16) as multi:  # MultiSAETrainer's kind
        batch = next(multi)
    assert {h: (t.shape, t.dtype) for h, t in batch.items()} == {
        h: ((B, store.hook_widths[h]), torch.bfloat16) for h in (HA, HB)
    }


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_harvest_data_never_imports_torch(store):
    done = _run(f"""
        import sys
        import harvest, harvest.data
        from harvest import open_store
        s = open_store({str(store.root)!r})
        next(iter(s.batches({HA!r}, 8)))
        s.stats({HA!r})
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_without_torch_harvest_torch_says_so_in_one_line():
    done = _run("""
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        import harvest.data
        try:
            import harvest.torch
        except ImportError as e:
            from harvest.errors import HarvestError
            assert isinstance(e, HarvestError)
            print(e)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "harvest.torch needs PyTorch, which is not installed: pip install torch (harvest.data works without it)"
    ]


def test_saelens_trainer_trains_from_a_harvest_store(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d, steps = 16, 300
    store = open_store(make_store(tmp_path, shards=4, widths=(d, d), dtype="bfloat16"))
    opts = dict(exclude=("first_token", "outliers"))  # the 50x sinks and 100x planted rows would dominate the MSE
    torch.manual_seed(0)
    sae = sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(d_in=d, d_sae=32, k=4))
    held_out = torch.cat(list(ht.batches(store, HA, 256, shuffle=False, **opts)))  # [n, d] float32, every row

    def mse() -> float:
        with torch.no_grad():
            return float(((sae(held_out) - held_out) ** 2).sum(-1).mean())

    before = mse()
    cfg = SAETrainerConfig(
        total_training_samples=steps * B,
        train_batch_size_samples=B,
        lr=3e-3,
        lr_end=3e-3,
        logger=LoggingConfig(log_to_wandb=False),  # offline: no wandb run, no checkpoints
        feature_sampling_window=100,
        dead_feature_window=100,
    )
    with ht.TorchDataProvider(store, HA, B, seed=0, **opts) as provider:
        assert provider.batches.batches_per_epoch() < steps  # the provider repeats the store's rows
        trained = SAETrainer(cfg=cfg, sae=sae, data_provider=provider).fit()
        assert provider.steps == steps
    after = mse()
    assert trained is sae
    print(f"held-out MSE {before:.3f} -> {after:.3f}")
    assert after < 0.6 * before, (before, after)
