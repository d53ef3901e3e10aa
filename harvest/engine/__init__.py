"""The Qwen2 engine: model description, weights pytree, forward pass and generation.

Read in pipeline order: config (ModelConfig) -> params (ParamSpec table) -> hooks (capture points)
-> model (layers) -> state (the slot pool) -> prefill -> decode -> generate (continuous batching);
sampling and stopping run inside the decode loop.
"""
