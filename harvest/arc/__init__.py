"""ARC-AGI tasks as prompts: sources, augmentations, prompts with a token-to-cell map, scoring."""

from harvest.arc.augment import AugmentConfig, SequenceSpec, apply, invert, make_sequences
from harvest.arc.prompts import FORMATS, SEGMENTS, Prompt, PromptBuilder, PromptConfig, format_grid
from harvest.arc.scoring import (
    ParsedAnswer,
    format_summary,
    parse_answer,
    parse_grid,
    score_sequence,
    score_tasks,
    vote,
)
from harvest.arc.tasks import Skipped, Task, load_tasks

__all__ = [
    "Task",
    "Skipped",
    "load_tasks",
    "AugmentConfig",
    "SequenceSpec",
    "make_sequences",
    "apply",
    "invert",
    "FORMATS",
    "SEGMENTS",
    "PromptConfig",
    "PromptBuilder",
    "Prompt",
    "format_grid",
    "parse_grid",
    "parse_answer",
    "ParsedAnswer",
    "score_sequence",
    "score_tasks",
    "vote",
    "format_summary",
]
