"""A generated row becomes a stored sequence: decode-token cell labels (harvest.cli.records)."""

import numpy as np
import pytest

from harvest.arc import FORMATS, PromptBuilder, PromptConfig
from harvest.cli.records import answer_cells

G = np.array([[1, 2, 0], [3, 4, 5]], np.uint8)


@pytest.fixture(scope="module")
def tok(qwen_tokenizer):
    return qwen_tokenizer


def test_answer_cells(tok):
    for fmt in FORMATS:
        pb = PromptBuilder(tok, PromptConfig(format=fmt, chat=False))
        ids = list(pb.answer_ids(G)) + tok("Input:\n77\n", add_special_tokens=False)["input_ids"]
        rows, cols = answer_cells(tok, ids, fmt)
        assert rows.dtype == np.int16 and len(rows) == len(ids)
        cell = rows >= 0
        got = [(int(r), int(c), tok.decode([i])) for r, c, i in zip(rows[cell], cols[cell], np.asarray(ids)[cell])]
        assert got == [(r, c, str(G[r, c])) for r in range(2) for c in range(3)]
    # a chat answer with a fence and EOS
    ids = tok("```\n120\n345\n```", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rows, cols = answer_cells(tok, ids, "digits")
    assert (rows >= 0).sum() == 6 and rows[-1] == -1
    # unparseable -> all -1; empty -> empty
    rows, cols = answer_cells(tok, tok("12\n3\n")["input_ids"], "digits")
    assert (rows == -1).all() and (cols == -1).all()
    assert len(answer_cells(tok, [], "digits")[0]) == 0


def test_answer_cells_split_newlines(tok):
    nl = tok.convert_tokens_to_ids("Ċ")  # a lone "\n": sampling may give "\n", "\n" instead of "\n\n"
    ids = (
        tok("12\n34", add_special_tokens=False)["input_ids"]
        + [nl, nl]
        + tok("é9", add_special_tokens=False)["input_ids"]
    )
    rows, cols = answer_cells(tok, ids, "digits")
    assert rows[:5].tolist() == [0, 0, -1, 1, 1] and cols[:5].tolist() == [0, 1, -1, 0, 1] and (rows[5:] == -1).all()
    # a character split over two byte-level tokens before the grid: offsets must still line up
    pre = tok("\U0001f9a9 grid:\n", add_special_tokens=False)["input_ids"]
    assert "\ufffd" in tok.decode(pre[:1])
    rows, cols = answer_cells(tok, pre + tok("12\n34\n\n", add_special_tokens=False)["input_ids"], "digits")
    cell = rows >= 0
    assert list(zip(rows[cell], cols[cell])) == [(0, 0), (0, 1), (1, 0), (1, 1)] and not cell[: len(pre)].any()
