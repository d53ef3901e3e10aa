"""Stop rules: the byte spelling of every token (token_bytes_of) and the in-jit stop-string automaton."""

import numpy as np
import pytest

from harvest.engine.stopping import StopRules, token_bytes_of


@pytest.fixture(scope="module")
def token_bytes(qwen_tokenizer):
    return token_bytes_of(qwen_tokenizer)


@pytest.mark.parametrize(
    "text",
    ["12\n34\n\nInput:\n", "Output: ```\n0 1 2\n```", "héllo wörld 中文 🦩\n\n", "  leading spaces\tand tabs\r\n"],
)
def test_token_bytes_concatenate_to_the_text(qwen_tokenizer, token_bytes, text):
    ids = qwen_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert b"".join(token_bytes[i] for i in ids) == text.encode()


def test_token_bytes_cover_the_vocabulary(qwen_tokenizer, token_bytes):
    assert len(token_bytes) >= len(qwen_tokenizer)
    # byte-level pieces decode to themselves; special tokens are their plain text
    for i in (16, 198, 271, 510, 2505):
        assert token_bytes[i] == qwen_tokenizer.decode([i]).encode()
    assert token_bytes[151645] == b"<|im_end|>"
    # a character split over two tokens: each token holds raw bytes, not a replacement character
    ids = qwen_tokenizer("🦩", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1 and b"".join(token_bytes[i] for i in ids) == "🦩".encode()


def test_stop_table_matches_a_blank_line_across_and_inside_tokens(qwen_tokenizer, token_bytes):
    _, table, lengths = StopRules((), ("\n\n",), token_bytes).tables(len(token_bytes))
    table = np.asarray(table)[0]  # [states, V]

    def run(ids):
        state = 0
        for i in ids:
            state = int(table[state, i])
        return state == int(lengths[0])

    enc = lambda s: qwen_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert run(enc("12\n34\n\n"))  # the merged "\n\n" token
    assert run(enc("12\n") + enc("\n"))  # "\n" then "\n"
    assert not run(enc("12\n34\n"))
    assert run(enc("12\n\nInput"))  # absorbing: once matched, stays matched
