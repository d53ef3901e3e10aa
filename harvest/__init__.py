"""harvest: Qwen2 in JAX over ARC-AGI, with prefill and decode activations stored in Zarr v3 shards.

The public API (imported lazily, so `from harvest.data import open_store` never pulls in JAX):

    from harvest import load_model, parse_hooks, Generator, GenerateConfig, SamplingConfig
    from harvest import open_store
    from harvest.run import run                                           # the CLI's pipeline, callable

    lm = load_model("Qwen/Qwen2.5-0.5B-Instruct", "bfloat16")          # or a folder, .gguf, random:tiny
    hooks = parse_hooks(["blocks.12.hook_resid_post"], lm.cfg)
    gen = Generator(lm.cfg, lm.params, GenerateConfig(max_new_tokens=64, prefill_hooks=hooks,
                                                      decode_hooks=hooks), eos_ids=lm.eos_ids)
    a, b = gen.generate([ids_a, ids_b], sequence_ids=[0, 1])   # Finished: tokens, activations, stop reason

    s = open_store("outputs/demo")                                        # what `harvest run configs/demo.yaml` wrote
    for x in s.batches("blocks.0.hook_resid_post", 4096): ...
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "harvest.weights.checkpoint",
    "ModelConfig": "harvest.engine.config",
    "parse_hooks": "harvest.engine.hooks",
    "Hook": "harvest.engine.hooks",
    "Generator": "harvest.engine.generate",
    "GenerateConfig": "harvest.engine.generate",
    "SamplingConfig": "harvest.engine.sampling",
    "open_store": "harvest.data",
    "HarvestError": "harvest.errors",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'harvest' has no attribute {name!r}")
