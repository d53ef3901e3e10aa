"""Tiny random Qwen2 checkpoints written by transformers itself, and transformers' reference forward.

torch is imported lazily: only the tests that compare against transformers need it.
"""

from __future__ import annotations

import numpy as np

TINY = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=160,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
)


def make_hf_model(seed: int = 0, tie: bool = False, **overrides):
    """A tiny Qwen2ForCausalLM with every weight randomised at a scale that gives peaked logits
    and non-uniform attention (transformers' init leaves biases at zero, hiding bias bugs)."""
    import torch
    import transformers

    cfg = transformers.Qwen2Config(**{**TINY, "tie_word_embeddings": tie, **overrides})
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif "embed" in name or "lm_head" in name:
                p.copy_(1.0 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def saved_hf_model(tmp_path_factory, name: str, seed: int, tie: bool, **overrides):
    """(torch model, folder) for a tiny model saved as safetensors by transformers."""
    model = make_hf_model(seed, tie, **overrides)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return model, folder


def random_ids(n: int, seed: int = 0, vocab: int = TINY["vocab_size"]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.int32)


def hf_forward(model, ids):
    """transformers' hidden states plus module outputs captured with forward hooks."""
    import torch

    caught = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(
            layer.self_attn.register_forward_hook(
                lambda m, a, out, i=i: caught.__setitem__(f"blocks.{i}.hook_attn_out", out[0])
            )
        )
        handles.append(
            layer.mlp.register_forward_hook(lambda m, a, out, i=i: caught.__setitem__(f"blocks.{i}.hook_mlp_out", out))
        )
        handles.append(
            layer.mlp.down_proj.register_forward_hook(
                lambda m, a, out, i=i: caught.__setitem__(f"blocks.{i}.mlp.hook_post", a[0])
            )
        )
    with torch.no_grad():
        out = model(torch.tensor(ids[None], dtype=torch.long), output_hidden_states=True)
    for h in handles:
        h.remove()
    return out, {k: v[0].numpy() for k, v in caught.items()}
