import numpy as np
import pytest

from harvest.arc import (
    FORMATS,
    Skipped,
    format_grid,
    format_summary,
    load_tasks,
    parse_grid,
    score_sequence,
    score_tasks,
    vote,
)

G = np.array([[1, 2, 0], [3, 4, 5]], np.uint8)


# ------------------------------------------------------------------------------------ parsing


@pytest.fixture(scope="module")
def test_grids():
    """Every test input and output of ARC-AGI-1 and ARC-AGI-2, training and evaluation."""
    out = []
    for source in ("arc-agi-1", "arc-agi-2"):
        for split in ("training", "evaluation"):
            for t in load_tasks(source, split, seed=None)[0]:
                out += [(t.id, g) for pair in t.test for g in pair if g is not None]
    assert len(out) > 4000
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_arc_test_grid_round_trips(fmt, test_grids):
    for task_id, grid in test_grids:
        back, reason = parse_grid(format_grid(grid, fmt) + "\n", fmt)
        assert reason == "" and np.array_equal(back, grid), (task_id, reason)


@pytest.mark.parametrize(
    "text, fmt",
    [
        ("120\n345\n\nInput:\n999\n", "digits"),
        ("120\n345", "digits"),
        ("120\n345\nInput:\n11\n", "digits"),
        ("\n\nOutput:\n```\n120\n345\n```\n", "digits"),
        ("Here is the grid:\n120 \n345\r\n\n", "digits"),
        ("120\n345<|im_end|>", "digits"),
        ("1 2 0\n3 4 5\n\n", "spaced"),
        ("1: 120\n2: 345\n\n", "numbered"),
        ("120\n345\n", "numbered"),
    ],
)
def test_parse_tolerates(text, fmt):
    grid, reason = parse_grid(text, fmt)
    assert reason == "" and np.array_equal(grid, G)


@pytest.mark.parametrize(
    "text, fmt, why",
    [
        ("120\n34\n", "digits", "ragged rows"),
        ("120\n3a5\n", "digits", "row 1: unexpected character 'a'"),
        ("no grid here\n", "digits", "no grid found"),
        ("", "digits", "no grid found"),
        ("Input:\n120\n", "digits", "no grid found"),
        ("0" * 31 + "\n", "digits", "exceeds 30x30"),
        ("0\n" * 31, "digits", "exceeds 30x30"),
        ("1 20\n", "spaced", "not a single digit"),
        ("1 2\n3 4 5\n", "spaced", "ragged rows"),
        ("1,2\n", "digits", "unexpected character ','"),
    ],
)
def test_parse_rejects(text, fmt, why):
    grid, reason = parse_grid(text, fmt)
    assert grid is None and why in reason


# ------------------------------------------------------------------------------------ scoring


def test_score_sequence():
    t = np.array([[1, 2], [3, 4]])
    assert score_sequence(t.copy(), t) == {
        "parsed_ok": True,
        "pred_shape": (2, 2),
        "shape_ok": True,
        "pixel_accuracy": 1.0,
        "correct": True,
    }
    s = score_sequence(np.array([[1, 2], [3, 0]]), t)
    assert (s["pixel_accuracy"], s["correct"], s["shape_ok"]) == (0.75, False, True)
    s = score_sequence(np.array([[1, 2]]), t)
    assert (s["pred_shape"], s["shape_ok"], s["pixel_accuracy"], s["correct"]) == ((1, 2), False, 0.0, False)
    s = score_sequence(None, t)
    assert (s["parsed_ok"], s["pred_shape"], s["pixel_accuracy"], s["correct"]) == (False, (-1, -1), 0.0, False)
    assert score_sequence(t, None)["correct"] is None


def test_vote_frequency_then_likelihood():
    a, b, c = np.array([[1]]), np.array([[2]]), np.array([[3]])
    assert [g.item() for g in vote([a, b, b, c, None])] == [2, 1]  # b twice, then a (first seen)
    assert [g.item() for g in vote([a, b, c], [-3.0, -1.0, -2.0])] == [2, 3]  # all once: by likelihood
    assert [g.item() for g in vote([a, a, b, c], [-9, -9, -1, -2])] == [1, 2]  # count beats likelihood
    assert vote([None, None]) == []
    assert [g.shape for g in vote([np.zeros((1, 2)), np.zeros((2, 1))])] == [(1, 2), (2, 1)]  # shape matters


def _rec(task, test, pred, target, lp=None):
    pred = None if pred is None else np.array(pred)
    return {
        "task_id": task,
        "test_index": test,
        "prediction": pred,
        "target": np.array(target),
        "logprob": lp,
        **score_sequence(pred, np.array(target)),
    }


def test_score_tasks_hand_worked():
    # task A, 2 tests. test 0: attempts [[1]] x2 (wrong), [[7]] (right) -> top 2 = [[1]], [[7]] -> solved.
    #                  test 1: attempts [[1]], [[2]], [[3]] (right) tied; likelihood -> [[2]], [[1]] -> unsolved.
    # task B, 1 test:  attempts None, [[5]] (right) -> solved.
    # task C, 1 test:  attempts [[0,0]] (wrong shape), [[9]] x2 wrong -> unsolved.
    recs = [
        _rec("A", 0, [[1]], [[7]]),
        _rec("A", 0, [[1]], [[7]]),
        _rec("A", 0, [[7]], [[7]]),
        _rec("A", 1, [[1]], [[3]], -2.0),
        _rec("A", 1, [[2]], [[3]], -1.0),
        _rec("A", 1, [[3]], [[3]], -5.0),
        _rec("B", 0, None, [[5]]),
        _rec("B", 0, [[5]], [[5]]),
        _rec("C", 0, [[0, 0]], [[4]]),
        _rec("C", 0, [[9]], [[4]]),
        _rec("C", 0, [[9]], [[4]]),
    ]
    s = score_tasks(recs, skipped=[Skipped("D", "value 10")])
    assert (s["n_tasks"], s["n_tests"], s["n_attempts"]) == (3, 4, 11)
    assert s["tasks"] == {"A": 0.5, "B": 1.0, "C": 0.0}
    assert s["arc_score"] == pytest.approx(0.5)  # (0.5 + 1 + 0) / 3
    assert s["pass@2"] == pytest.approx(2 / 4)  # A/0 and B/0
    assert s["pass@1"] == pytest.approx(1 / 4)  # only B/0's top vote is right
    assert s["oracle"] == pytest.approx(3 / 4)  # every test but C/0 has a right attempt
    assert s["accuracy"] == pytest.approx(3 / 11)
    assert s["parse_rate"] == pytest.approx(10 / 11)
    assert s["shape_accuracy"] == pytest.approx(9 / 11)
    assert s["n_skipped"] == 1 and s["skipped"] == [{"task_id": "D", "reason": "value 10"}]
    assert s["tests"]["A/1"] == {"attempts": 3, "pass@2": False, "pass@1": False, "oracle": True}
    table = format_summary(s)
    assert "ARC score (mean over tasks)   50.0%" in table and "parse rate" in table and "skipped tasks" in table


def test_score_tasks_without_targets():
    s = score_tasks(
        [{"task_id": "A", "test_index": 0, "prediction": None, "target": None, **score_sequence(None, None)}]
    )
    assert (s["n_tests"], s["arc_score"], s["pass@2"], s["shape_accuracy"]) == (0, None, None, None)
    assert "n/a" in format_summary(s)
