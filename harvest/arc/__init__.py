"""ARC-AGI tasks as prompts: sources, augmentations, prompts with a token-to-cell map, scoring."""

from harvest.arc.augment import AugmentConfig, Sequence, apply, invert, make_sequences
from harvest.arc.prompts import (FORMATS, SEGMENTS, Prompt, PromptBuilder, PromptConfig, format_grid)
from harvest.arc.scoring import answer_cells, format_summary, parse_grid, score_sequence, score_tasks, vote
from harvest.arc.tasks import Skipped, Task, load_tasks

__all__ = [
    "Task", "Skipped", "load_tasks",
    "AugmentConfig", "Sequence", "make_sequences", "apply", "invert",
    "FORMATS", "SEGMENTS", "PromptConfig", "PromptBuilder", "Prompt", "format_grid",
    "parse_grid", "answer_cells", "score_sequence", "score_tasks", "vote", "format_summary",
]
