import pytest


@pytest.fixture(scope="module")
def tok(qwen_tokenizer):
    """The real Qwen2 tokenizer (see tests/conftest.py)."""
    return qwen_tokenizer
