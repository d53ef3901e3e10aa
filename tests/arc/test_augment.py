import json

import numpy as np
import pytest

from harvest.arc import AugmentConfig, Task, apply, invert, load_tasks, make_sequences
from harvest.arc.augment import color_table, dihedral, dihedral_inverse


def _grid(rng, h=3, w=5):
    return rng.integers(0, 10, (h, w)).astype(np.uint8)


def _task(rng, tid="t", n_train=3, n_test=2):
    pairs = lambda n: tuple((_grid(rng, 2 + i, 3), _grid(rng, 3, 2 + i)) for i in range(n))  # noqa: E731
    return Task(tid, pairs(n_train), pairs(n_test))


def test_dihedral_group():
    g = np.arange(6).reshape(2, 3)
    images = [dihedral(g, k) for k in range(8)]
    assert len({(x.shape, x.tobytes()) for x in images}) == 8  # all 8 distinct on an asymmetric grid
    for k in range(8):
        assert np.array_equal(dihedral_inverse(dihedral(g, k), k), g)
    assert np.array_equal(dihedral(g, 1), np.rot90(g)) and np.array_equal(dihedral(g, 4), np.fliplr(g))


def test_color_tables_are_permutations():
    rng = np.random.default_rng(0)
    for keep_zero in (True, False):
        for _ in range(50):
            p = color_table(rng, keep_zero)
            assert sorted(p.tolist()) == list(range(10))
            assert (p[0] == 0) or not keep_zero


@pytest.mark.parametrize(
    "cfg",
    [
        AugmentConfig(dihedral="all", colors=2),
        AugmentConfig(dihedral=[1, 6], colors=1, keep_zero=False, shuffle_demos=True),
    ],
)
def test_apply_invert_identity_on_real_tasks(cfg):
    tasks, _ = load_tasks("arc-agi-1", "evaluation", limit=40)
    for s in make_sequences(tasks, cfg):
        orig = next(t for t in tasks if t.id == s.task_id)
        test_in, test_out = orig.test[s.test_index]
        assert np.array_equal(invert(s.test_input, s.augmentation), test_in)
        assert np.array_equal(invert(s.target, s.augmentation), test_out)
        # a colour permutation never merges colours: same number of distinct colours
        assert len(np.unique(s.test_input)) == len(np.unique(test_in))
        order = s.augmentation["demo_order"] or range(len(orig.train))
        for (ai, ao), i in zip(s.task.train, order):
            assert np.array_equal(invert(ai, s.augmentation), orig.train[i][0])
            assert np.array_equal(invert(ao, s.augmentation), orig.train[i][1])


def test_make_sequences_counts_ids_and_records():
    rng = np.random.default_rng(1)
    tasks = [_task(rng, "a"), _task(rng, "b", n_test=1)]
    cfg = AugmentConfig(dihedral="all", colors=2, shuffle_demos=True)
    seqs = make_sequences(tasks, cfg, samples=3, seed=7)
    assert len(seqs) == 3 * 8 * 2 * 3
    assert [s.sequence_id for s in seqs] == list(range(len(seqs)))
    again = make_sequences(tasks, cfg, samples=3, seed=7)
    assert [s.augmentation for s in seqs] == [s.augmentation for s in again]
    assert make_sequences(tasks, cfg, seed=8)[0].augmentation != seqs[0].augmentation
    json.dumps([s.augmentation for s in seqs])  # records are JSON-able
    s = seqs[5]
    assert set(s.augmentation) == {"dihedral", "colors", "demo_order"}
    assert sorted(s.augmentation["demo_order"]) == [0, 1, 2] and s.augmentation["colors"][0] == 0
    assert len(s.task.test) == 1 and s.target is s.task.test[0][1]
    # a task's records don't depend on what else was selected
    alone = make_sequences(tasks[1:], cfg, samples=3, seed=7)
    assert [x.augmentation for x in alone] == [x.augmentation for x in seqs if x.task_id == "b"]


def test_default_config_is_identity():
    rng = np.random.default_rng(2)
    task = _task(rng)
    seqs = make_sequences([task], AugmentConfig(), samples=2)
    assert [(s.test_index, s.sample_index) for s in seqs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert seqs[0].augmentation == {"dihedral": 0, "colors": None, "demo_order": None}
    assert np.array_equal(seqs[2].target, task.test[1][1])
    assert invert(None, seqs[0].augmentation) is None and apply(None, seqs[0].augmentation) is None
    with pytest.raises(ValueError):
        AugmentConfig(dihedral=[8]).dihedrals()


def test_missing_target_stays_none():
    rng = np.random.default_rng(3)
    t = Task("x", ((_grid(rng), _grid(rng)),), ((_grid(rng), None),))
    (s,) = make_sequences([t], AugmentConfig(dihedral=[2], colors=1))
    assert s.target is None and s.test_input.shape == (3, 5)
