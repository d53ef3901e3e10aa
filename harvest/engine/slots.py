"""The host's view of the pool: sequences in flight, the prefill lanes, and shared prompt prefixes.

A prompt that starts like one already in a slot need not be prefilled from scratch: its slot gets a
copy of that donor's KV cache (prefill.fork) and prefill resumes at the first chunk past the shared
part. Identical prompts (`generation.samples`) skip prefill entirely: the copy also arms the slot
from the donor's prompt-end logits, which the pool keeps while the donor decodes, so a copy can enter
whenever one slot frees. The shared rows' activations are the donor's (same tokens, same positions:
causality makes them the same numbers), so every finished sequence still carries its whole prompt.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np


@dataclasses.dataclass(eq=False)
class InFlight:
    """A sequence in flight: its prompt, its slot and the prefill activations collected so far."""

    sequence_id: int
    prompt: np.ndarray  # [n] int32
    slot: int = -1
    key: int = 0  # prompt_key(prompt): copies of one prompt share it (scheduling only; donors compare tokens)
    next_chunk: int = 0  # the next prompt chunk to prefill (the first past `shared` once forked)
    donor: InFlight | None = None  # the sequence whose cache holds this prompt's first `shared` tokens
    shared: int = 0  # prompt tokens copied from the donor instead of prefilled (a whole chunk count or len)
    forked: bool = False
    prefill_acts: dict = dataclasses.field(default_factory=dict)  # hook name -> [n, width] host array, filled
    # chunk by chunk as each prefill call lands; rows below `shared` are filled from the donor when read

    @property
    def whole_shared(self) -> bool:
        return self.shared == len(self.prompt)

    def covered(self, chunk: int) -> int:
        """Prompt tokens whose keys and values are in this slot's cache (or queued to be, by calls issued)."""
        if self.whole_shared and self.forked:
            return len(self.prompt)
        return min(self.next_chunk * chunk, len(self.prompt))

    def can_fork(self, chunk: int) -> bool:
        return self.donor is not None and not self.forked and self.donor.covered(chunk) >= self.shared

    def land(self, name: str, begin: int, rows: np.ndarray) -> None:
        """Put one prefilled chunk's activations ([n, width], prompt rows from `begin`) in place."""
        buf = self.prefill_acts.get(name)
        if buf is None:  # one array per hook for the whole prompt: no per-chunk copies to join later
            buf = self.prefill_acts[name] = np.empty((len(self.prompt), rows.shape[-1]), rows.dtype)
        buf[begin : begin + len(rows)] = rows

    def settle(self) -> None:
        """Copy the donor's rows of a partly shared prompt into this prompt's own arrays and let the donor
        go, so that a finished donor's arrays are freed with it rather than held while this one decodes.
        Call once the donor's rows below `shared` have landed (the end of the round that forked this one)."""
        if self.donor is None or self.whole_shared or not self.forked:
            return
        for name, rows in self.donor.prompt_acts().items():
            self.land(name, 0, rows[: self.shared])
        self.donor = None

    def prompt_acts(self) -> dict[str, np.ndarray]:
        """hook name -> [n, width], once prefill is done: the donor's first `shared` rows, then this
        sequence's own. A whole copy of a prompt gets the donor's arrays themselves (read-only use)."""
        if self.donor is None:
            return self.prefill_acts
        borrowed = self.donor.prompt_acts()
        if self.whole_shared:
            return borrowed
        for k, a in borrowed.items():
            self.prefill_acts[k][: self.shared] = a[: self.shared]
        return self.prefill_acts


def prompt_key(prompt: np.ndarray) -> int:
    return hash(prompt.tobytes())


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """The number of leading tokens two prompts share."""
    m = min(len(a), len(b))
    differ = np.flatnonzero(a[:m] != b[:m])
    return int(differ[0]) if len(differ) else m


def choose_donor(seq: InFlight, candidates, chunk: int) -> None:
    """Give `seq` the in-flight sequence it saves the most prefill by copying from, if any. An identical
    prompt is copied whole, decoding or not; otherwise only whole chunks are taken (never the prompt's
    last token: its logits must be computed). A partial share is at least a chunk."""
    n = len(seq.prompt)
    best = 0
    for other in candidates:
        if other is seq:
            continue
        same = common_prefix(seq.prompt, other.prompt)
        if same == n == len(other.prompt):
            saved = n
        else:
            saved = min(same, n - 1) // chunk * chunk
            if saved < chunk:
                continue
        if saved > best:  # ties: the first candidate
            seq.donor, seq.shared, best = other, saved, saved


@dataclasses.dataclass
class Lanes:
    """The prefill lanes: each carries one prompt, chunk after chunk, until it is in its slot's cache."""

    size: int
    seqs: list = dataclasses.field(default_factory=list)
    waiting: collections.deque = dataclasses.field(default_factory=collections.deque)  # have a slot, no lane yet
    pending: list = dataclasses.field(default_factory=list)  # have a slot, wait for their donor's cache
    queued: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # prompt key -> copies
    # not yet given a slot (counted only where prefixes are shared)

    def __post_init__(self):
        self.seqs = [None] * self.size

    @property
    def busy(self) -> int:
        return sum(s is not None for s in self.seqs)

    def short_of(self, width: int) -> int:
        """Prompts a prefill round lacks to fill `width` lanes: it moves the prompts in the lanes and
        waiting for one forward, and with them those that will copy their caches: the pending ones and
        the queued copies of their prompts (8 samples of one prompt fill a call on one lane)."""
        carried = [s for s in self.seqs if s is not None] + list(self.waiting)
        copies = sum(self.queued[s.key] for s in carried)
        return max(0, width - len(carried) - len(self.pending) - copies)

    def refill(self) -> None:
        self.seqs = [s if s is not None else (self.waiting.popleft() if self.waiting else None) for s in self.seqs]
