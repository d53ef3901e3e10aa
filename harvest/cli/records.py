"""One generated row becomes one stored sequence: its table row, per-token labels and activations.

    builder = RecordBuilder(tokenizer, "digits", hooks, phases, targets)
    record = builder.record(finished, sequence_spec, prompt)     # finished: engine.generate.Finished

Prompt tokens carry the cell map the prompt builder made; generated tokens get their cell in the
parsed answer (`answer_cells`). The answer is parsed, un-augmented and scored here, once, and
the pipeline's summary re-reads the stored text through the same `read_answer`/`attempt`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import numpy as np

from harvest import arc
from harvest.engine.generate import Finished
from harvest.engine.hooks import Hook
from harvest.engine.slots import common_prefix
from harvest.store.format import PHASES, SEGMENTS, STOP_REASONS
from harvest.store.shard import SequenceRecord


def token_spans(tokenizer, ids) -> tuple[str, np.ndarray]:
    """Decode ids -> (text, char offsets [T, 2]); special tokens decode to nothing."""
    ids = [int(i) for i in ids]
    kw = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
    pieces = tokenizer.batch_decode([[i] for i in ids], **kw)
    text = tokenizer.decode(ids, **kw)
    if "".join(pieces) != text:
        # a multi-byte character split over tokens: measure prefixes instead
        pieces = [""] * len(ids)
        prev = 0
        for k in range(len(ids)):
            n = len(tokenizer.decode(ids[: k + 1], **kw).rstrip("\ufffd"))
            pieces[k], prev = "x" * max(n - prev, 0), max(n, prev)
    ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
    starts = ends - np.array([len(p) for p in pieces], dtype=np.int64)
    return text, np.stack([starts, ends], 1).reshape(-1, 2)


def answer_cells(tokenizer, generated_ids, fmt: str = "digits") -> tuple[np.ndarray, np.ndarray]:
    """Per generated token, its (row, col) in the parsed answer grid; -1 for non-cell tokens and
    for every token when the answer doesn't parse. -> (rows int16 [T], cols int16 [T])."""
    text, spans = token_spans(tokenizer, generated_ids)
    rows = np.full(len(spans), -1, np.int16)
    cols = np.full(len(spans), -1, np.int16)
    parsed = arc.parse_answer(text, fmt)
    if parsed.grid is None or not len(spans):
        return rows, cols
    where, rr, cc = parsed.cell_chars, parsed.rows, parsed.cols
    # token k holds the cell at char p iff start_k <= p < end_k; take the first cell per token
    k = np.searchsorted(spans[:, 1], where, side="right")
    ok = (k < len(spans)) & (spans[np.minimum(k, len(spans) - 1), 0] <= where)
    k, rr, cc = k[ok], rr[ok], cc[ok]
    first = np.unique(k, return_index=True)[1]
    rows[k[first]], cols[k[first]] = rr[first], cc[first]
    return rows, cols


def shared_prompts(prompts: Mapping[int, np.ndarray], min_shared: int) -> dict[int, tuple[int, int]]:
    """{sequence id: (donor id, P)} for every prompt whose first P >= min_shared tokens are also the first
    P tokens of an earlier sequence's prompt (the longest such P; ties: the lowest donor id). Those rows
    are stored once, with the donor (docs/FORMAT.md, "Shared prompts"); prompts not listed store all
    their rows. A pure function of the prompts, so every session and process of a run agrees on it.

    Sorted lexicographically, a prompt's longest common prefix with any other is with a neighbour, and
    it shrinks with the distance, so the scan each way stops at the first earlier sequence."""
    if min_shared <= 0 or len(prompts) < 2:
        return {}
    order = sorted(prompts, key=lambda i: (prompts[i].tolist(), i))
    lcp = [common_prefix(prompts[a], prompts[b]) for a, b in zip(order, order[1:])]  # [S - 1]: neighbours
    plan = {}
    for j, sid in enumerate(order):
        best = (0, -1)  # (P, donor)
        for step in (-1, 1):
            shared, k = len(prompts[sid]), j
            while 0 <= k + step < len(order):
                shared = min(shared, lcp[min(k, k + step)])
                k += step
                if shared < min_shared:
                    break
                if order[k] < sid:
                    best = max(best, (shared, -order[k]))
                    break
        if best[0]:
            plan[sid] = (-best[1], best[0])
    return plan


def read_answer(text: str, augmentation: dict, fmt: str):
    """The generated text as a grid in the task's original frame (augmentation undone), or None."""
    return arc.invert(arc.parse_grid(text, fmt)[0], augmentation)


@dataclasses.dataclass(frozen=True)
class RecordBuilder:
    tokenizer: object
    fmt: str  # the prompt's grid format, which answers are parsed in
    hooks: tuple[Hook, ...]
    phases: frozenset[str]  # the phases whose tokens are stored
    targets: dict  # (task id, test index) -> the original answer grid, or None
    answers: bool = True  # False in a prefill-only run: the answer columns hold their missing values

    def attempt(self, task_id: str, test_index: int, prediction) -> dict:
        """One scored attempt, as arc.score_tasks takes it."""
        target = self.targets.get((task_id, test_index))
        return {
            **arc.score_sequence(prediction, target),
            "task_id": task_id,
            "test_index": test_index,
            "prediction": prediction,
            "target": target,
        }

    def record(
        self, done: Finished, seq: arc.SequenceSpec, prompt: arc.Prompt, shared: tuple[int, int] | None = None
    ) -> SequenceRecord:
        """shared: (donor id, P) from `shared_prompts`: the first P prompt rows are stored with the donor."""
        n, gen_ids = len(prompt), done.tokens
        if "prefill" not in self.phases:
            shared = None  # no prompt row is stored at all
        donor, p = shared or (-1, 0)
        text = self.tokenizer.decode(gen_ids, skip_special_tokens=True)
        score = self.attempt(seq.task_id, seq.test_index, read_answer(text, seq.augmentation, self.fmt))
        answer = dict(
            generated_text=text,
            parsed_ok=score["parsed_ok"],
            pred_h=score["pred_shape"][0],
            pred_w=score["pred_shape"][1],
            shape_ok=score["shape_ok"],
            pixel_accuracy=score["pixel_accuracy"],
            correct=score["correct"],
            logprob=done.logprob,
        )
        if not self.answers:  # nothing was generated: missing, not wrong (docs/FORMAT.md)
            answer = dict.fromkeys(answer)
        meta = dict(
            sequence_id=seq.sequence_id,
            task_id=seq.task_id,
            test_index=seq.test_index,
            augmentation=json.dumps(seq.augmentation),
            sample_index=seq.sample_index,
            prompt_length=n,
            prompt_sequence_id=donor,
            shared_prompt_length=p,
            generated_length=len(gen_ids),
            stop_reason=STOP_REASONS[done.stop_reason],
            **answer,
            chat=prompt.chat,
            has_target=seq.target is not None,
        )
        cols, acts = [], {h.name: [] for h in self.hooks}
        if "prefill" in self.phases:
            cols.append(
                dict(
                    token_id=prompt.token_ids[p:],
                    position=np.arange(p, n),
                    phase=np.full(n - p, PHASES["prefill"]),
                    segment=prompt.segment[p:],
                    example=prompt.example[p:],
                    row=prompt.row[p:],
                    col=prompt.col[p:],
                )
            )
            for h in self.hooks:
                acts[h.name].append(done.prefill_acts[h.name][p:])  # [n - p, width]
        if "decode" in self.phases:
            t = len(gen_ids)
            rows, cells_col = answer_cells(self.tokenizer, gen_ids, self.fmt)
            cols.append(
                dict(
                    token_id=gen_ids,
                    position=n + np.arange(t),
                    phase=np.full(t, PHASES["decode"]),
                    segment=np.full(t, SEGMENTS["answer"]),
                    example=np.full(t, -1),
                    row=rows,
                    col=cells_col,
                )
            )
            for h in self.hooks:
                acts[h.name].append(done.decode_acts[h.name])  # [t, width]
        tokens = {k: np.concatenate([c[k] for c in cols]) for k in cols[0]}
        return SequenceRecord(meta, tokens, {k: np.concatenate(v) for k, v in acts.items()})
