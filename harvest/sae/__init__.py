"""Sparse coders trained on harvest stores: TopK SAE (default), BatchTopK, TopK transcoder (docs/SAE.md).

    from harvest.sae import load_config, train, load_sae, reconstruct

    summary = train(load_config("configs/sae-demo.yaml"))      # or `harvest train configs/sae-demo.yaml`
    sae = load_sae("outputs/sae-demo/sae")                      # a flax.nnx SparseCoder
    x_hat = reconstruct(sae, x)                                 # raw activations in, raw out

Modules: config (YAML sections), model (the NNX module, reconstruct), data (held-out split, batch
stream), state (TrainState, init, optimiser), objective (loss, AuxK, steps), sharding (mesh),
checkpoint (orbax), metrics (FVU, JSONL), export (harvest and SAELens formats), trainer (the loop),
cli (`harvest train`). Names are imported on first use, so that `harvest run` (whose CLI registers
`harvest train`) does not load flax, optax and orbax.
"""

import importlib

_EXPORTS = {
    "TrainConfig": "harvest.sae.config",
    "from_dict": "harvest.sae.config",
    "load_config": ("harvest.sae.config", "load"),
    "train": "harvest.sae.trainer",
    "SAESpec": "harvest.sae.model",
    "SparseCoder": "harvest.sae.model",
    "reconstruct": "harvest.sae.model",
    "load_sae": "harvest.sae.export",
    "save_sae": "harvest.sae.export",
    "export_saelens": "harvest.sae.export",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'harvest.sae' has no attribute {name!r}")
    module, attr = _EXPORTS[name] if isinstance(_EXPORTS[name], tuple) else (_EXPORTS[name], name)
    return getattr(importlib.import_module(module), attr)
