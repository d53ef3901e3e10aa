"""Continuous batching on the host side: admit prompts into free slots, prefill, decode, retire.

    gen = Generator(lm.cfg, lm.params, GenerateConfig(max_new_tokens=64, decode_hooks=hooks), eos_ids=lm.eos_ids)
    for done in gen.stream([(0, ids_a), (1, ids_b), ...]):    # in the order sequences finish
        done.tokens, done.decode_acts["blocks.3.hook_resid_post"], done.stop_reason
    outs = gen.generate([ids_a, ids_b], sequence_ids=[0, 1])  # all at once, in input order

The pool has `decode_slots` slots. Each round: free slots take the next prompts in the given order
(in whole prefill calls of `batch_size` lanes while more wait), the prompts are prefilled chunk by
chunk into their slots, then one decode segment runs until `batch_size` slots are free again (or
`segment_steps` steps), and finished slots are read and handed back. Shapes never depend on the
prompts, so the whole stream compiles one prefill and one decode program.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Iterable, Iterator, Sequence

import jax
import numpy as np

from harvest.engine.config import ModelConfig
from harvest.engine.decode import DecodeConfig, decode_segment, read_slot
from harvest.engine.hooks import Hook
from harvest.engine.prefill import prefill_chunk
from harvest.engine.sampling import SamplingConfig, row_keys
from harvest.engine.state import PrefillChunk, SlotState, StopTables, empty_state
from harvest.engine.stopping import StopRules
from harvest.errors import FieldError


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    batch_size: int = 8  # prompts per prefill call (lanes)
    decode_slots: int = 32  # sequences decoding at once; decode is bandwidth-bound, so more is cheap
    prefill_chunk: int = 256  # prompt tokens per lane per prefill call: padding < one chunk per prompt
    max_prompt_len: int = 1024  # cache room for a prompt; longer prompts are refused
    max_new_tokens: int = 64
    sampling: SamplingConfig = SamplingConfig()
    fixed_length: bool = False  # every row generates exactly max_new_tokens: EOS and stop strings are ignored
    stop_strings: tuple[str, ...] = ()
    seed: int = 0
    segment_steps: int = 32  # decode steps between two looks at the pool
    prefill_hooks: tuple[Hook, ...] = ()
    decode_hooks: tuple[Hook, ...] = ()

    def __post_init__(self):
        for name in ("batch_size", "decode_slots", "max_prompt_len", "max_new_tokens", "segment_steps"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"{getattr(self, name)} is impossible; it must be >= 1")
        if self.decode_slots < self.batch_size:
            raise FieldError(
                "decode_slots", f"{self.decode_slots} is below batch_size={self.batch_size}; it must be >= batch_size"
            )
        if self.prefill_chunk < 16 or self.prefill_chunk & (self.prefill_chunk - 1):
            raise FieldError("prefill_chunk", f"{self.prefill_chunk} is impossible; it must be a power of two >= 16")
        if not 0 <= self.seed < 2**32:
            raise FieldError("seed", f"{self.seed} is impossible; it must be in [0, 2**32)")
        if not all(self.stop_strings):
            raise FieldError("stop_strings", "must be non-empty strings: an empty one would stop every row at once")

    @property
    def cache_len(self) -> int:
        """Columns per slot: the prompt room rounded up to whole chunks, then the answer."""
        c = self.prefill_chunk
        return -(-self.max_prompt_len // c) * c + self.max_new_tokens


@dataclasses.dataclass
class Finished:
    """One sequence's results, on the host."""

    sequence_id: int
    prompt_length: int
    tokens: np.ndarray  # [t] int32 generated ids, the stop token included
    stop_reason: int  # stopping.STOP_*
    logprob: float  # sum of the model's log-probabilities of the generated tokens (before temperature)
    prefill_acts: dict[str, np.ndarray]  # hook name -> [prompt_length, width]
    decode_acts: dict[str, np.ndarray]  # hook name -> [t, width]


@dataclasses.dataclass
class _Seq:
    """A sequence in flight: its prompt, its slot and the prefill activations collected so far."""

    sequence_id: int
    prompt: np.ndarray
    slot: int
    next_chunk: int = 0
    pieces: list = dataclasses.field(default_factory=list)  # (prefill call index, lane, n_valid)
    prefill_acts: dict = dataclasses.field(default_factory=dict)


class CompileCounter:
    """Counts XLA backend compiles (and their seconds) in this process, from jax.monitoring events."""

    count = 0
    seconds = 0.0

    @classmethod
    def on_event(cls, event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            cls.count += 1
            cls.seconds += duration


jax.monitoring.register_event_duration_secs_listener(CompileCounter.on_event)


class Generator:
    def __init__(self, cfg: ModelConfig, params, gcfg: GenerateConfig, *, eos_ids=(), token_bytes=None):
        if gcfg.sampling.top_k > cfg.vocab_size:
            raise FieldError("top_k", f"{gcfg.sampling.top_k} exceeds the vocabulary ({cfg.vocab_size})")
        self.cfg, self.params, self.gcfg = cfg, params, gcfg
        self.dcfg = DecodeConfig(gcfg.max_new_tokens, gcfg.sampling, gcfg.fixed_length, gcfg.decode_hooks)
        rules = StopRules(tuple(eos_ids), tuple(gcfg.stop_strings), token_bytes)
        self.tables = StopTables(*rules.tables(cfg.vocab_size))
        self.timings = {"prefill_seconds": 0.0, "decode_seconds": 0.0, "decode_steps": 0, "prefill_calls": 0}
        self._state: SlotState | None = None

    def generate(self, prompts: Sequence[Sequence[int]], sequence_ids: Sequence[int]) -> list[Finished]:
        """Every prompt's results, in input order."""
        done = {f.sequence_id: f for f in self.stream(zip(sequence_ids, prompts))}
        return [done[int(i)] for i in sequence_ids]

    def stream(self, items: Iterable[tuple[int, Sequence[int]]]) -> Iterator[Finished]:
        """(sequence id, prompt ids) pairs, admitted in the given order; yields each as it finishes."""
        g = self.gcfg
        queue = collections.deque(self._check(i, p) for i, p in items)
        if len({s.sequence_id for s in queue}) != len(queue):
            raise ValueError("sequence ids must be unique")
        state = self._state if self._state is not None else self._empty_state()
        self._state = None  # donated below; restored when the stream ends cleanly
        n_slots = g.decode_slots
        occupant: list[_Seq | None] = [None] * n_slots
        while queue or any(occupant):
            free = [i for i, o in enumerate(occupant) if o is None]
            k = min(len(free), len(queue))
            if len(queue) > k:
                k -= k % g.batch_size  # while more wait, admit whole prefill calls only
            admitted = []
            for slot in free[:k]:
                seq = queue.popleft()
                seq.slot, occupant[slot] = slot, seq
                admitted.append(seq)
            if admitted:
                state = self._prefill(state, admitted)
            want = min(g.batch_size, len(queue)) if queue else n_slots + 1
            want = max(want, n_slots - sum(o is not None for o in occupant) + 1)
            t0 = time.perf_counter()
            state, steps = decode_segment(self.cfg, self.dcfg, self.params, state, self.tables, g.segment_steps, want)
            steps, active, num_generated, stop_reason, logprob = jax.device_get(
                (steps, state.active, state.num_generated, state.stop_reason, state.logprob)
            )
            self.timings["decode_seconds"] += time.perf_counter() - t0
            self.timings["decode_steps"] += int(steps)
            for slot, seq in enumerate(occupant):
                if seq is not None and not active[slot]:
                    occupant[slot] = None
                    tokens, acts = jax.device_get(read_slot(state, slot))
                    n = int(num_generated[slot])
                    yield Finished(
                        seq.sequence_id,
                        len(seq.prompt),
                        np.asarray(tokens[:n]),
                        int(stop_reason[slot]),
                        float(logprob[slot]),
                        seq.prefill_acts,
                        {k: np.asarray(a[:n]) for k, a in acts.items()},
                    )
        self._state = state

    def _check(self, sequence_id, prompt) -> _Seq:
        ids = np.asarray(prompt, np.int32).reshape(-1)
        if not len(ids):
            raise ValueError(f"sequence {sequence_id}: empty prompt")
        if len(ids) > self.gcfg.max_prompt_len:
            raise ValueError(
                f"sequence {sequence_id}: prompt of {len(ids)} tokens exceeds max_prompt_len={self.gcfg.max_prompt_len}"
            )
        return _Seq(int(sequence_id), ids, -1)

    def _empty_state(self) -> SlotState:
        g = self.gcfg
        dtype = self.params["embed"].dtype
        return empty_state(
            self.cfg, g.decode_slots, g.cache_len, g.max_new_tokens, g.decode_hooks, self.tables.num_strings, dtype
        )

    def _prefill(self, state: SlotState, admitted: list[_Seq]) -> SlotState:
        """Prefill the admitted prompts into their slots, `batch_size` lanes per call; a lane whose prompt
        is done takes the next one. Collects each prompt's activations on the host."""
        g, c = self.gcfg, self.gcfg.prefill_chunk
        t0 = time.perf_counter()
        pending = collections.deque(admitted)
        lanes: list[_Seq | None] = [None] * g.batch_size
        calls = []
        while pending or any(lanes):
            lanes = [lane if lane is not None else (pending.popleft() if pending else None) for lane in lanes]
            slot = np.full(g.batch_size, g.decode_slots, np.int32)
            tokens = np.zeros((g.batch_size, c), np.int32)
            start = np.zeros(g.batch_size, np.int32)
            n_valid = np.zeros(g.batch_size, np.int32)
            ids = np.zeros(g.batch_size, np.uint32)
            for r, seq in enumerate(lanes):
                if seq is None:
                    continue
                begin = seq.next_chunk * c
                piece = seq.prompt[begin : begin + c]
                slot[r], start[r], n_valid[r], ids[r] = seq.slot, begin, len(piece), seq.sequence_id
                tokens[r, : len(piece)] = piece
                seq.pieces.append((len(calls), r, len(piece)))
                seq.next_chunk += 1
            last = np.array([s is not None and s.next_chunk * c >= len(s.prompt) for s in lanes])
            chunk = PrefillChunk(slot, tokens, start, n_valid, last, row_keys(g.seed, ids))
            state, acts = prefill_chunk(self.cfg, g.prefill_hooks, self.params, state, chunk)
            calls.append(acts)
            self.timings["prefill_calls"] += 1
            lanes = [None if done else seq for seq, done in zip(lanes, last)]
        host = jax.device_get(calls)
        for seq in admitted:
            seq.prefill_acts = {
                h.name: np.concatenate([host[i][h.name][r, :n] for i, r, n in seq.pieces]) for h in g.prefill_hooks
            }
        self.timings["prefill_seconds"] += time.perf_counter() - t0
        return state
