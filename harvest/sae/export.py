"""Saving a trained sparse coder: harvest's own files (any architecture, reloaded by load_sae) and
SAELens' on-disk format (topk; batchtopk as SAELens does, as a JumpReLU SAE).

harvest format, OUT/sae/:
    sae.json            {"format": "harvest-sae", "version": 1, "spec": SAESpec, "hooks", "store", ...}
    sae.safetensors     W_enc [d_in, S], b_enc [S], W_dec [S, d_out], b_dec [d_out] (normalised units),
                        scale_in, scale_out, threshold [] float32

SAELens format (SAE.load_from_disk(OUT/saelens)), sae_lens 6.x:
    cfg.json                  SAEConfig.to_dict(): d_in, d_sae, dtype, device, apply_b_dec_to_input=true,
                              normalize_activations="none", reshape_activations="none", metadata
                              (sae_lens_version >= 6 so no pre-6 renaming applies), architecture; topk: k,
                              rescale_acts_by_decoder_norm=false
    sae_weights.safetensors   W_enc [d_in, S], b_enc [S], W_dec [S, d_in], b_dec [d_in] (jumprelu: + threshold [S])

The normalisation is folded in (SAELens' fold_activation_norm_scaling_factor): with s the scale,
(s x - b) @ W_enc = (x - b / s) @ (s W_enc) and (z @ W_dec + b) / s = z @ (W_dec / s) + b / s, so the
exported SAE takes raw activations with normalize_activations "none" and gives the same pre-activations,
codes (TopK on them, unaffected by the decoder norms since rescale_acts_by_decoder_norm is false) and
reconstructions as ours. SAELens has no TopK transcoder (its transcoders are ReLU / JumpReLU), so a
transcoder is saved in harvest's format only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from harvest.errors import HarvestError
from harvest.sae.model import SAESpec, SparseCoder

__all__ = ["save_sae", "load_sae", "export_saelens", "SAELENS_ARCHITECTURES", "SAELENS_FORMAT_VERSION"]

FORMAT, VERSION = "harvest-sae", 1
SAELENS_ARCHITECTURES = {"topk": "topk", "batchtopk": "jumprelu"}
# The SAELens on-disk layout we write: that of sae_lens 6.x (>= 6.0.0 skips its pre-6 key renaming).
SAELENS_FORMAT_VERSION = "6.0.0"
_WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")
_SCALARS = ("scale_in", "scale_out", "threshold")


class SAEFileError(HarvestError, ValueError):
    """A folder that does not hold a harvest SAE."""


def _arrays(sae: SparseCoder) -> dict[str, np.ndarray]:
    return {name: np.asarray(getattr(sae, name)[...], np.float32) for name in (*_WEIGHTS, *_SCALARS)}


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def save_sae(sae: SparseCoder, folder: str | os.PathLike, info: dict | None = None) -> Path:
    """Write OUT/sae.json + sae.safetensors (unfolded: normalised weights and the scales)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_arrays(sae), str(folder / "sae.safetensors"))
    spec = sae.spec
    _write_json(folder / "sae.json", {"format": FORMAT, "version": VERSION, "spec": spec.to_dict(), **(info or {})})
    return folder


def load_sae(folder: str | os.PathLike) -> SparseCoder:
    """A SparseCoder from save_sae's folder (OUT/sae of a training)."""
    folder = Path(folder)
    try:
        doc = json.loads((folder / "sae.json").read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        spec = SAESpec.from_dict(doc["spec"])
        arrays = load_file(str(folder / "sae.safetensors"))
    except (OSError, ValueError, KeyError) as e:
        raise SAEFileError(f"{folder}: not a harvest SAE folder ({e}); give OUT/sae of a harvest train run") from None
    sae = nnx.eval_shape(lambda: SparseCoder(spec, rngs=nnx.Rngs(0)))
    for name in (*_WEIGHTS, *_SCALARS):
        getattr(sae, name).set_value(jnp.asarray(arrays[name]))  # abstract values: replaced, not indexed
    return sae


def folded(sae: SparseCoder) -> dict[str, np.ndarray]:
    """SAELens' weights (see the module docstring), float32; an SAE only (one scale, b_dec applied to the input)."""
    a = {k: v.astype(np.float64) for k, v in _arrays(sae).items()}
    s_in, s_out = a["scale_in"], a["scale_out"]
    out = {
        "W_enc": a["W_enc"] * s_in,
        "b_enc": a["b_enc"],
        "W_dec": a["W_dec"] / s_out,
        "b_dec": a["b_dec"] / s_out,
    }
    if sae.spec.architecture == "batchtopk":
        out["threshold"] = np.full(sae.spec.d_sae, a["threshold"])
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def export_saelens(sae: SparseCoder, folder: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write SAELens' cfg.json + sae_weights.safetensors for a topk or batchtopk SAE (see above)."""
    spec = sae.spec
    if spec.architecture not in SAELENS_ARCHITECTURES:
        raise SAEFileError(
            f"sae.architecture {spec.architecture}: SAELens has no TopK transcoder; set output.saelens: false"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(folded(sae), str(folder / "sae_weights.safetensors"), metadata={"format": "pt"})
    cfg = {
        "d_in": spec.d_in,
        "d_sae": spec.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # folded into the weights
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
            "hook_name": spec.hook_in,
            "hook_head_index": None,
            "prepend_bos": True,
            **(metadata or {}),
        },
        "architecture": SAELENS_ARCHITECTURES[spec.architecture],
    }
    if spec.architecture == "topk":
        cfg |= {"k": spec.k, "rescale_acts_by_decoder_norm": False}
    _write_json(folder / "cfg.json", cfg)
    return folder
