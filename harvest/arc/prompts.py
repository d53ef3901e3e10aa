"""ARC prompts: grid formats, base and chat prompts, and the per-token structure map.

The text is built piece by piece with a label per character (segment, example, row, col). The
tokenizer's offsets then give every token the labels of the characters it covers, so merged
tokens such as ":\n" (text) or the "\n\n" that closes a grid come out right without assuming how
Qwen2 splits anything.

Base prompt, per demonstration then the test input:
    Input:\n<grid>Output:\n<grid>\n      ...      Input:\n<grid>Output:\n
where <grid> is one line per row, each ending in "\n".
"""

from __future__ import annotations

import dataclasses

import numpy as np

from harvest.arc.augment import SequenceSpec
from harvest.arc.tasks import MAX_SIDE, TaskError
from harvest.errors import FieldError
from harvest.store.format import SEGMENTS

TEXT, EX_IN, EX_OUT, TEST_IN, ANSWER = (
    SEGMENTS[k] for k in ("text", "example_input", "example_output", "test_input", "answer")
)
FORMATS = ("digits", "spaced", "numbered")
BASE_STOP_STRINGS = ("\n\n", "Input")

DEFAULT_USER = (
    "Each example below shows an input grid and its output grid; one rule maps every input to "
    "its output. Find the rule and apply it to the last input. Answer with the output grid "
    "only, in the same format: one row per line, one digit 0-9 per cell."
)


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    format: str = "digits"  # digits "0120" | spaced "0 1 2 0" | numbered "1: 0120"
    chat: bool | str = "auto"  # "auto": chat template iff the model is instruct and has one
    system: str | None = None  # None: the template's default system turn
    user: str = DEFAULT_USER  # chat only: instructions before the examples

    def __post_init__(self):
        if self.format not in FORMATS:
            raise FieldError("format", f"{self.format!r} is not one of {', '.join(FORMATS)}")
        if self.chat not in (True, False, "auto"):
            raise FieldError("chat", f"{self.chat!r} is not one of true, false, auto")


@dataclasses.dataclass(frozen=True, eq=False)
class Prompt:
    token_ids: np.ndarray  # int32 [n]
    segment: np.ndarray  # int8  [n]  SEGMENTS code
    example: np.ndarray  # int16 [n]  demonstration index; -1 for the test input and text
    row: np.ndarray  # int16 [n]  cell row, -1 when the token is not a cell
    col: np.ndarray  # int16 [n]
    text: str
    chat: bool = False

    def __len__(self) -> int:
        return len(self.token_ids)


# --------------------------------------------------------------------------------- grid formats


def grid_pieces(grid: np.ndarray, fmt: str = "digits"):
    """Yield (text, row, col) pieces of a formatted grid; separators and labels have row = col = -1."""
    for r, cells in enumerate(np.asarray(grid).tolist()):
        if fmt == "numbered":
            yield f"{r + 1}: ", -1, -1
        for c, v in enumerate(cells):
            if c and fmt == "spaced":
                yield " ", -1, -1
            yield str(v), r, c
        yield "\n", -1, -1


def format_grid(grid: np.ndarray, fmt: str = "digits") -> str:
    """[h, w] -> text with one line per row, each ending in a newline."""
    return "".join(p for p, _, _ in grid_pieces(grid, fmt))


class _Labelled:
    """Text plus per-character labels, appended piece by piece."""

    def __init__(self):
        self.parts: list[str] = []
        self.seg: list[int] = []
        self.ex: list[int] = []
        self.row: list[int] = []
        self.col: list[int] = []

    def add(self, s: str, seg: int = TEXT, ex: int = -1, row: int = -1, col: int = -1):
        n = len(s)
        self.parts.append(s)
        self.seg += [seg] * n
        self.ex += [ex] * n
        self.row += [row] * n
        self.col += [col] * n

    def add_grid(self, grid, fmt: str, seg: int, ex: int):
        for s, r, c in grid_pieces(grid, fmt):
            self.add(s, seg, ex, r, c)

    def extend(self, other: _Labelled):
        self.parts += other.parts
        self.seg += other.seg
        self.ex += other.ex
        self.row += other.row
        self.col += other.col

    @property
    def text(self) -> str:
        return "".join(self.parts)


def task_body(seq: SequenceSpec, fmt: str, output_header: bool = True) -> _Labelled:
    """Demonstrations and the test input, labelled per character."""
    b = _Labelled()
    for i, (inp, out) in enumerate(seq.task.train):
        b.add("Input:\n")
        b.add_grid(inp, fmt, EX_IN, i)
        b.add("Output:\n")
        b.add_grid(out, fmt, EX_OUT, i)
        b.add("\n")
    b.add("Input:\n")
    b.add_grid(seq.test_input, fmt, TEST_IN, -1)
    if output_header:
        b.add("Output:\n")
    return b


# -------------------------------------------------------------------------------- token mapping


def label_tokens(offsets: np.ndarray, seg, ex, row, col):
    """Character labels -> token labels. offsets [n, 2] -> (segment, example, row, col) [n] each.

    A token takes the segment and example of its first character, and the cell of the first cell
    character it covers (Qwen2 never puts two cells in one token; the tests check that).
    """
    n_chars = len(seg)
    seg, ex, row, col = (np.asarray(a + [-1], np.int16) for a in (seg, ex, row, col))  # pad: empty tail
    start = np.minimum(offsets[:, 0], n_chars)
    end = np.minimum(np.maximum(offsets[:, 1], offsets[:, 0]), n_chars)
    is_cell = col[:n_chars] >= 0
    before = np.concatenate([[0], np.cumsum(is_cell)])  # [n_chars + 1] cells before position
    has_cell = before[end] > before[start]
    cell_pos = np.flatnonzero(is_cell)
    first = cell_pos[np.minimum(before[start], max(len(cell_pos) - 1, 0))] if len(cell_pos) else start
    tok_row = np.where(has_cell, row[first], -1)
    tok_col = np.where(has_cell, col[first], -1)
    tok_seg = np.where(seg[start] < 0, TEXT, seg[start])
    return tok_seg.astype(np.int8), ex[start].astype(np.int16), tok_row.astype(np.int16), tok_col.astype(np.int16)


# ------------------------------------------------------------------------------------- builder


class PromptBuilder:
    """SequenceSpec -> Prompt for one tokenizer and config. `instruct` says whether the model is an
    instruct model; with chat="auto" the chat template is used iff instruct and the tokenizer has one."""

    def __init__(self, tokenizer, cfg: PromptConfig = PromptConfig(), instruct: bool = False):
        self.tokenizer, self.cfg = tokenizer, cfg
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.chat = (instruct and has_template) if cfg.chat == "auto" else bool(cfg.chat)
        if self.chat and not has_template:
            raise FieldError("chat", "true, but the tokenizer has no chat template; use chat: false or auto")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        # base models keep writing grids; chat turns end with EOS (<|im_end|>)
        return () if self.chat else BASE_STOP_STRINGS

    def render(self, seq: SequenceSpec) -> _Labelled:
        """The full prompt text with character labels (template text is TEXT)."""
        if not self.chat:
            return task_body(seq, self.cfg.format)
        body = task_body(seq, self.cfg.format, output_header=False)
        user = (self.cfg.user + "\n\n" if self.cfg.user else "") + body.text
        messages = [{"role": "system", "content": self.cfg.system}] if self.cfg.system is not None else []
        messages.append({"role": "user", "content": user})
        full = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        at = full.rfind(body.text)
        if at < 0:
            raise TaskError(
                "the chat template altered the task text, so tokens cannot be mapped to cells; use chat: false"
            )
        out = _Labelled()
        out.add(full[:at])
        out.extend(body)
        out.add(full[at + len(body.text) :])
        return out

    def build(self, seq: SequenceSpec) -> Prompt:
        lab = self.render(seq)
        text = lab.text
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
        seg, ex, row, col = label_tokens(offsets, lab.seg, lab.ex, lab.row, lab.col)
        return Prompt(np.asarray(enc["input_ids"], np.int32), seg, ex, row, col, text, self.chat)

    def answer_text(self, grid: np.ndarray) -> str:
        """What a perfect answer looks like: the grid, plus the blank line for base prompts."""
        return format_grid(grid, self.cfg.format) + ("" if self.chat else "\n")

    def answer_ids(self, grid: np.ndarray) -> np.ndarray:
        """Token ids of `answer_text` (for teacher forcing); chat answers end with EOS."""
        ids = self.tokenizer(self.answer_text(grid), add_special_tokens=False)["input_ids"]
        if self.chat and self.tokenizer.eos_token_id is not None:
            ids = ids + [self.tokenizer.eos_token_id]
        return np.asarray(ids, np.int32)

    @property
    def max_answer_tokens(self) -> int:
        """New tokens the largest grid (30 x 30) needs in this format, stop included. +1 because a
        sampled answer may end in "\n", "\n" where the tokenizer would write one "\n\n"."""
        big = (np.arange(MAX_SIDE * MAX_SIDE) % 10).reshape(MAX_SIDE, MAX_SIDE)
        return len(self.answer_ids(big)) + 1
