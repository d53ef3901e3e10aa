"""Seeded, invertible augmentations and the task -> sequences expansion.

An augmentation is a JSON-able record {"dihedral": k, "colors": p or None, "demo_order": [...] or
None}. Grids map as  g' = p[D_k(g)]  and back as  g = D_k^-1(argsort(p)[g']). Colours go through
a lookup table, never a chain of replaces, so two colours can't merge.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence

import numpy as np

from harvest.arc.tasks import Task
from harvest.errors import FieldError

N_DIHEDRAL = 8


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    dihedral: bool | str | tuple[int, ...] = False  # False: identity; True/"all": all 8; or indices 0..7
    colors: int = 0  # colour permutations per dihedral map (0: colours untouched)
    keep_zero: bool = True  # keep the background colour 0 fixed
    shuffle_demos: bool = False  # a fresh demonstration order per variant

    def __post_init__(self):
        if self.colors < 0:
            raise FieldError("colors", f"{self.colors} is impossible; it must be >= 0")
        self.dihedrals()

    def dihedrals(self) -> tuple[int, ...]:
        if self.dihedral is False or self.dihedral is None:
            return (0,)
        if self.dihedral is True or self.dihedral == "all":
            return tuple(range(N_DIHEDRAL))
        ks = tuple(int(k) for k in self.dihedral)
        if not ks or any(not 0 <= k < N_DIHEDRAL for k in ks):
            raise FieldError("dihedral", f"indices must be 0..7, got {self.dihedral!r}")
        return ks


@dataclasses.dataclass(frozen=True, eq=False)
class SequenceSpec:
    """One prompt to run: an (augmented) task, one of its test inputs, one sample."""

    sequence_id: int
    task_id: str
    test_index: int
    augmentation: dict
    sample_index: int
    task: Task  # augmented; its .test holds only the chosen test pair
    target: np.ndarray | None  # augmented target [h, w]

    @property
    def test_input(self) -> np.ndarray:
        return self.task.test[0][0]


# ------------------------------------------------------------------------------ grid transforms


def dihedral(grid: np.ndarray, k: int) -> np.ndarray:
    """k in 0..3: rotate k quarter turns anticlockwise; 4..7: flip left-right, then rotate k-4."""
    g = np.fliplr(grid) if k >= 4 else grid
    return np.rot90(g, k % 4)


def dihedral_inverse(grid: np.ndarray, k: int) -> np.ndarray:
    g = np.rot90(grid, -(k % 4))
    return np.fliplr(g) if k >= 4 else g


def color_table(rng: np.random.Generator, keep_zero: bool = True) -> np.ndarray:
    """A permutation p of 0..9 (p[old] = new); p[0] = 0 when keep_zero."""
    if keep_zero:
        return np.concatenate([[0], 1 + rng.permutation(9)]).astype(np.uint8)
    return rng.permutation(10).astype(np.uint8)


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.uint8)
    a.setflags(write=False)
    return a


def apply(grid: np.ndarray | None, aug: dict) -> np.ndarray | None:
    """Forward map of one grid under an augmentation record."""
    if grid is None:
        return None
    g = dihedral(np.asarray(grid), aug.get("dihedral", 0))
    if aug.get("colors") is not None:
        g = np.asarray(aug["colors"], np.uint8)[g]
    return _frozen(g)


def invert(grid: np.ndarray | None, aug: dict) -> np.ndarray | None:
    """Undo `apply` on a (predicted) grid: colours first, then the dihedral map (reverse order)."""
    if grid is None:
        return None
    g = np.asarray(grid)
    if aug.get("colors") is not None:
        g = np.argsort(np.asarray(aug["colors"]))[g]
    return _frozen(dihedral_inverse(g, aug.get("dihedral", 0)))


def augment_task(task: Task, aug: dict) -> Task:
    """Apply a record to every grid of a task and reorder the demonstrations."""
    order = aug.get("demo_order") or range(len(task.train))
    train = tuple((apply(task.train[i][0], aug), apply(task.train[i][1], aug)) for i in order)
    test = tuple((apply(i, aug), apply(o, aug)) for i, o in task.test)
    return Task(task.id, train, test)


# ------------------------------------------------------------------------------------ expansion


def _rng(seed: int, task_id: str, test_index: int) -> np.random.Generator:
    # keyed by task id, not position, so a task's augmentations don't change with the selection;
    # the trailing 0 keeps the draws of stores written by harvest 0.1
    return np.random.default_rng([seed, zlib.crc32(task_id.encode()), test_index, 0])


def records_for(task: Task, test_index: int, cfg: AugmentConfig, seed: int = 0) -> list[dict]:
    """The augmentation records for one test input: dihedrals x colour tables."""
    out = []
    rng = _rng(seed, task.id, test_index)
    for k in cfg.dihedrals():
        for _ in range(max(cfg.colors, 1)):
            p = color_table(rng, cfg.keep_zero).tolist() if cfg.colors > 0 else None
            order = rng.permutation(len(task.train)).tolist() if cfg.shuffle_demos else None
            out.append({"dihedral": k, "colors": p, "demo_order": order})
    return out


def make_sequences(
    tasks: Sequence[Task], cfg: AugmentConfig = AugmentConfig(), samples: int = 1, seed: int = 0
) -> list[SequenceSpec]:
    """One SequenceSpec per (task, test input, augmentation, sample); ids dense in that order."""
    seqs = []
    for task in tasks:
        for t, (test_in, test_out) in enumerate(task.test):
            one = Task(task.id, task.train, ((test_in, test_out),))
            for aug in records_for(task, t, cfg, seed):
                aug_task = augment_task(one, aug)
                for s in range(samples):
                    seqs.append(SequenceSpec(len(seqs), task.id, t, aug, s, aug_task, aug_task.test[0][1]))
    return seqs
