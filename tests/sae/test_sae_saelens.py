"""The SAELens export loads with sae_lens.SAE.load_from_disk and encodes / decodes RAW activations
exactly as our module does (the normalisation folded into the weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harvest.data import open_store
from harvest.sae.export import load_sae
from harvest.sae.trainer import train

torch = pytest.importorskip("torch")
sae_lens = pytest.importorskip("sae_lens")


def _compare(out, store_root, hook):
    ours = load_sae(out / "sae")
    theirs = sae_lens.SAE.load_from_disk(out / "saelens")
    x = open_store(store_root).activations(hook, dtype="float32")[:400]  # raw, sinks included
    z = np.asarray(ours.encode(x))
    with torch.no_grad():
        zt = theirs.encode(torch.from_numpy(x)).numpy()
        xt = theirs.decode(torch.from_numpy(zt)).numpy()
        ft = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(zt, z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xt, np.asarray(ours.decode(z)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ft, np.asarray(ours(x)), rtol=1e-5, atol=1e-5)
    assert ((zt != 0) == (z != 0)).all()  # the same latents fire
    return ours, theirs


def test_topk_export_matches_ours(trained, planted):
    ours, theirs = _compare(trained["out"], planted["root"], planted["hooks"][0])
    assert type(theirs).__name__ == "TopKSAE"
    assert theirs.cfg.k == ours.spec.k and theirs.cfg.d_sae == ours.spec.d_sae
    assert theirs.cfg.normalize_activations == "none" and theirs.cfg.metadata.hook_name == planted["hooks"][0]
    assert float(ours.scale_in[...]) != 1.0  # the scale is really folded, not trivially 1
    cfg = json.loads((trained["out"] / "saelens" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["rescale_acts_by_decoder_norm"] is False


def test_batchtopk_exports_as_jumprelu(planted, make_config, tmp_path):
    train(make_config(planted["root"], tmp_path, sae__architecture="batchtopk", train__steps=60))
    ours, theirs = _compare(tmp_path, planted["root"], planted["hooks"][0])
    assert type(theirs).__name__ == "JumpReLUSAE"
    assert np.allclose(theirs.threshold.detach().numpy(), float(ours.threshold[...]))
