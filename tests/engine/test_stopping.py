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


def reference_transition(pat: bytes, state: int, token: bytes) -> int:
    """The automaton's definition: matched (len(pat)) if the text so far plus the token holds the pattern,
    else the longest prefix of the pattern the text ends with. An empty token resets, as the engine's does."""
    text = pat[:state] + token
    if state == len(pat) or pat in text:
        return len(pat)
    if not token:
        return 0
    return max(k for k in range(len(pat)) if text.endswith(pat[:k]))


@pytest.mark.parametrize("pat", [b"\n\n", b"Input", b"\n\nInput", b"abab", b"aaa", b"]]"])
def test_stop_tables_follow_the_definition_for_every_token(token_bytes, pat):
    """The table builder skips tokens that cannot move the state off 0; none it skips may be one that does."""
    rng = np.random.default_rng(0)
    crafted = [b"", b"In", b"put", b"nput", b"putx", b"I", b"Inp", b"utIn", b"\nx", b"abab", b"babx", b"ba", b"a"]
    crafted += [b"aa", b"aax", b"b]", b"]", b"]x", b"\n"]  # ...x: a match across the boundary, from a token's start
    vocab = tuple(crafted + [token_bytes[i] for i in rng.choice(len(token_bytes), 4000, replace=False)])
    _, table, _ = StopRules((), (pat.decode(),), vocab).tables(len(vocab))
    table = np.asarray(table)[0]
    want = [[reference_transition(pat, s, tb) for tb in vocab] for s in range(len(pat) + 1)]
    np.testing.assert_array_equal(table, want)
