"""Loading Qwen2 weights into the engine's params pytree: hub ids, local safetensors folders, GGUF
files and random presets (checkpoint.load_model is the entry point)."""
