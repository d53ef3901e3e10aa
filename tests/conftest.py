"""Shared fixtures: tiny random Qwen2 checkpoints written by transformers itself."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=160, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
            max_position_embeddings=4096)


def make_hf_model(seed: int = 0, tie: bool = False, **overrides):
    """A tiny Qwen2ForCausalLM with every weight randomised at a scale that gives peaked logits
    and non-uniform attention (transformers' init leaves biases at zero, hiding bias bugs)."""
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


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    return saved_hf_model(tmp_path_factory, "tiny_untied", 0, tie=False)


@pytest.fixture(scope="session")
def hf_tiny_tied(tmp_path_factory):
    return saved_hf_model(tmp_path_factory, "tiny_tied", 1, tie=True)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2 tokenizer, shipped as package data."""
    from harvest.checkpoint import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="session")
def loaded_tiny(hf_tiny):
    from harvest.checkpoint import load_model

    return load_model(str(hf_tiny[1]), "float32")


def random_ids(n: int, seed: int = 0, vocab: int = TINY["vocab_size"]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.int32)
