import numpy as np
import pytest

from harvest.arc import (
    FORMATS,
    SEGMENTS,
    AugmentConfig,
    PromptBuilder,
    PromptConfig,
    format_grid,
    load_tasks,
    make_sequences,
)


@pytest.fixture(scope="module")
def seqs():
    tasks, _ = load_tasks("arc-agi-1", "evaluation", limit=6, seed=3)
    small, _ = load_tasks("arc-agi-1", "evaluation", task_ids=["00576224"], seed=None)  # 2x2 -> 6x6
    return make_sequences(small + tasks, AugmentConfig(dihedral=[0, 5], colors=1, shuffle_demos=True))


def _expected_cells(seq):
    """(segment, example, row, col, value) for every cell, in reading order."""
    out = []
    grids = [
        x
        for i, (a, b) in enumerate(seq.task.train)
        for x in ((SEGMENTS["example_input"], i, a), (SEGMENTS["example_output"], i, b))
    ]
    grids.append((SEGMENTS["test_input"], -1, seq.test_input))
    for seg, ex, g in grids:
        out += [(seg, ex, r, c, int(g[r, c])) for r in range(g.shape[0]) for c in range(g.shape[1])]
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("chat", [False, True])
def test_cell_map_matches_grids(tok, seqs, fmt, chat):
    pb = PromptBuilder(tok, PromptConfig(format=fmt, chat=chat))
    for seq in seqs[::3]:
        p = pb.build(seq)
        n = len(p)
        assert p.token_ids.dtype == np.int32 and p.segment.dtype == np.int8 and p.row.dtype == np.int16
        assert all(len(a) == n for a in (p.segment, p.example, p.row, p.col))
        assert tok.decode(p.token_ids) == p.text
        cell = p.col >= 0
        assert np.array_equal(cell, p.row >= 0)
        pieces = [tok.decode([i]) for i in p.token_ids[cell]]
        got = [
            (int(s), int(e), int(r), int(c), int(v))
            for s, e, r, c, v in zip(p.segment[cell], p.example[cell], p.row[cell], p.col[cell], pieces)
        ]
        assert got == _expected_cells(seq)  # every cell exactly one token, in order, right value
        # non-cell tokens inside grids are separators; text tokens carry no example index
        assert (p.example[p.segment == SEGMENTS["text"]] == -1).all()
        assert (p.example[p.segment == SEGMENTS["test_input"]] == -1).all()
        assert not (p.segment == SEGMENTS["answer"]).any()


def test_merged_tokens(tok, seqs):
    pb = PromptBuilder(tok, PromptConfig(format="digits", chat=False))
    seq = seqs[0]
    p = pb.build(seq)
    pieces = [tok.decode([i]) for i in p.token_ids]
    assert pieces[:2] == ["Input", ":\n"] and p.segment[1] == SEGMENTS["text"] and p.row[1] == -1
    assert p.text.endswith("Output:\n") and pieces[-2:] == ["Output", ":\n"]
    # the newline ending each example output merges with the blank line: one "\n\n" token,
    # labelled with the output grid (its first character) and no cell
    blanks = [i for i, s in enumerate(pieces) if s == "\n\n"]
    assert len(blanks) == len(seq.task.train)
    for i, k in enumerate(blanks):
        assert (p.segment[k], p.example[k], p.row[k], p.col[k]) == (SEGMENTS["example_output"], i, -1, -1)
        assert p.row[k - 1] == seq.task.train[i][1].shape[0] - 1  # last cell precedes it
    # digits format: one token per cell plus one per row end
    h, w = seq.test_input.shape
    assert ((p.segment == SEGMENTS["test_input"]) & (p.col < 0)).sum() == h


def test_chat_prompt(tok, seqs):
    cfg = PromptConfig(chat="auto", system="You solve puzzles.", user="Solve it.")
    assert not PromptBuilder(tok, cfg, instruct=False).chat
    pb = PromptBuilder(tok, cfg, instruct=True)
    assert pb.chat and pb.stop_strings == ()
    p = pb.build(seqs[0])
    assert p.chat and p.text.startswith("<|im_start|>system\nYou solve puzzles.<|im_end|>")
    assert "Solve it.\n\nInput:\n" in p.text and p.text.endswith("<|im_start|>assistant\n")
    assert p.segment[0] == SEGMENTS["text"] and p.token_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")

    class NoTemplate:
        chat_template = None

    assert not PromptBuilder(NoTemplate(), PromptConfig(), instruct=True).chat
    with pytest.raises(ValueError, match="no chat template"):
        PromptBuilder(NoTemplate(), PromptConfig(chat=True))
    with pytest.raises(ValueError):
        PromptConfig(format="json")


def test_base_stop_strings_and_answers(tok, seqs):
    pb = PromptBuilder(tok, PromptConfig(chat=False))
    assert pb.stop_strings == ("\n\n", "Input")
    g = seqs[0].target
    assert pb.answer_text(g) == format_grid(g) + "\n"
    assert tok.decode(pb.answer_ids(g)).endswith("\n\n")
    assert pb.max_answer_tokens == 30 * 31 + 1  # 900 cells, 30 row ends, a split blank line
    assert PromptBuilder(tok, PromptConfig(chat=True)).answer_ids(g)[-1] == tok.eos_token_id


def test_format_grid():
    g = np.array([[1, 2, 0], [3, 4, 5]])
    assert format_grid(g) == "120\n345\n"
    assert format_grid(g, "spaced") == "1 2 0\n3 4 5\n"
    assert format_grid(g, "numbered") == "1: 120\n2: 345\n"
