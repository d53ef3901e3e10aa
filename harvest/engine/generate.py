"""Continuous batching on the host side: admit prompts into free slots, prefill, decode, retire.

    gen = Generator(lm.cfg, lm.params, GenerateConfig(max_new_tokens=64, decode_hooks=hooks), eos_ids=lm.eos_ids)
    for done in gen.stream([(0, ids_a), (1, ids_b), ...]):    # in the order sequences finish
        done.tokens, done.decode_acts["blocks.3.hook_resid_post"], done.stop_reason
    outs = gen.generate([ids_a, ids_b], sequence_ids=[0, 1])  # all at once, in input order

The pool has `decode_slots` slots. Each round: free slots take the next prompts in the given order; the
prompts are prefilled into their slots by `batch_size` lanes, chunk by chunk (while more prompts wait, a
round runs only with at least `narrow_lanes` lanes busy, a narrow call costing per lane what a full one
does; a half-prefilled prompt keeps its lane for the next round; when at most half the lanes are busy,
their chunks go in calls `narrow_lanes` wide; each call's activations move to the host, in `acts_dtype`,
once the next call is queued); then one decode segment runs until enough rows finish to
fill a narrow call's lanes (or `segment_steps` steps), so freed slots refill soon, and
finished slots are read and handed back. At the end, when no prompt waits and at most `tail_slots` rows
are live, they move to a small pool. Shapes never depend on the prompts: a stream compiles at most two
prefill programs (full and narrow calls) and two decode programs (full pool, tail pool), whatever the
prompt lengths.

With max_new_tokens=0 (prefill only) nothing decodes: the pool is the `batch_size` lanes' own slots, the
forward pass stops at the deepest hooked layer, no LM head runs, and a prompt is finished as soon as
its last chunk is in.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import time
from collections.abc import Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from harvest.engine.config import ModelConfig
from harvest.engine.decode import DecodeConfig, compact, decode_segment, read_slot
from harvest.engine.hooks import Edit, Hook, layers_needed
from harvest.engine.model import DECODE_BLOCK, bounded_decode_attention
from harvest.engine.params import with_stacked
from harvest.engine.prefill import fork, prefill_chunk
from harvest.engine.sampling import SamplingConfig
from harvest.engine.sharding import Placement
from harvest.engine.slots import InFlight, Lanes, choose_donor, prompt_key
from harvest.engine.state import PrefillChunk, SlotState, StopTables, empty_state
from harvest.engine.stopping import STOP_NONE, StopRules
from harvest.errors import FieldError
from harvest.floats import FLOAT_DTYPES, cast


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    batch_size: int = 8  # prompts per prefill call (lanes)
    decode_slots: int = 32  # sequences decoding at once; decode is bandwidth-bound, so more is cheap
    prefill_chunk: int = 128  # prompt tokens per lane per prefill call: padding < one chunk per prompt
    narrow_lanes: int | None = None  # when few lanes are busy, prefill calls this wide (one more compiled
    # prefill program; a call's cost grows with its lanes, busy or not); None: batch_size // 4 (on a mesh,
    # rounded down to a multiple of `data`); 0: never
    max_prompt_len: int = 1024  # cache room for a prompt; longer prompts are refused
    max_new_tokens: int = 64  # 0: prefill only (no decode, no LM head, layers up to the deepest hook)
    sampling: SamplingConfig = SamplingConfig()
    fixed_length: bool = False  # every row generates exactly max_new_tokens: EOS and stop strings are ignored
    stop_strings: tuple[str, ...] = ()
    seed: int = 0
    segment_steps: int = 32  # decode steps between two looks at the pool
    tail_slots: int | None = None  # once no prompt waits and at most this many rows are live, decode them
    # in a pool of this size (one more compiled decode program); None: decode_slots // 4; 0: never
    prefill_hooks: tuple[Hook, ...] = ()
    decode_hooks: tuple[Hook, ...] = ()
    edit: Edit | None = None  # one hook's value replaced in prefill and decode (Generator's edit_params)
    share_prefixes: bool = True  # a prompt starting like one in flight copies its cache (engine.slots)
    acts_dtype: str | None = None  # captured activations reach the host as this float dtype (a store's
    # storage dtype: prompts in flight then take its bytes; float16 overflow is refused); None: the model's

    def __post_init__(self):
        for name in ("batch_size", "decode_slots", "max_prompt_len", "segment_steps"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"{getattr(self, name)} is impossible; it must be >= 1")
        if self.max_new_tokens < 0:
            raise FieldError("max_new_tokens", f"{self.max_new_tokens} is impossible; it must be >= 0")
        if self.prefill_only and self.decode_hooks:
            raise FieldError("max_new_tokens", "0 (prefill only) generates no answer to capture; capture prefill only")
        if self.tail_slots is not None and not 0 <= self.tail_slots < self.decode_slots:
            raise FieldError(
                "tail_slots", f"{self.tail_slots} is impossible; it must be in [0, decode_slots={self.decode_slots})"
            )
        if self.narrow_lanes is not None and not 0 <= self.narrow_lanes <= self.batch_size // 2:
            raise FieldError(
                "narrow_lanes",
                f"{self.narrow_lanes} is impossible; it must be in [0, batch_size / 2 = {self.batch_size // 2}]",
            )
        if self.decode_slots < self.batch_size:
            raise FieldError(
                "decode_slots", f"{self.decode_slots} is below batch_size={self.batch_size}; it must be >= batch_size"
            )
        if self.prefill_chunk < 16 or self.prefill_chunk & (self.prefill_chunk - 1):
            raise FieldError("prefill_chunk", f"{self.prefill_chunk} is impossible; it must be a power of two >= 16")
        if not 0 <= self.seed < 2**32:
            raise FieldError("seed", f"{self.seed} is impossible; it must be in [0, 2**32)")
        if self.acts_dtype is not None and self.acts_dtype not in FLOAT_DTYPES:
            raise FieldError("acts_dtype", f"{self.acts_dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
        if not all(self.stop_strings):
            raise FieldError("stop_strings", "must be non-empty strings: an empty one would stop every row at once")

    @property
    def prefill_only(self) -> bool:
        return self.max_new_tokens == 0

    @property
    def pool_slots(self) -> int:
        """Slots holding a KV cache: the decode pool, or in a prefill-only run just the lanes' own."""
        return self.batch_size if self.prefill_only else self.decode_slots

    @property
    def tail_pool(self) -> int:
        return self.decode_slots // 4 if self.tail_slots is None else self.tail_slots

    @property
    def narrow_width(self) -> int:
        return self.batch_size // 4 if self.narrow_lanes is None else self.narrow_lanes

    @property
    def cache_len(self) -> int:
        """Columns per slot: the prompt room rounded up to whole chunks, then the answer; where decode
        attention is bounded (a CPU), rounded up to whole blocks of it (model.DECODE_BLOCK)."""
        c = self.prefill_chunk
        n = -(-self.max_prompt_len // c) * c + self.max_new_tokens
        b = DECODE_BLOCK if bounded_decode_attention() else 1
        return -(-n // b) * b


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


EMPTY_STATE = jax.jit(empty_state, static_argnums=tuple(range(7)))


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
    def __init__(
        self,
        cfg: ModelConfig,
        params,
        gcfg: GenerateConfig,
        *,
        eos_ids=(),
        token_bytes=None,
        edit_params=None,
        mesh: Mesh | None = None,
    ):
        """mesh: a (data, model) mesh of this process's devices (sharding.make_mesh); None: one device."""
        if gcfg.sampling.top_k > cfg.vocab_size:
            raise FieldError("top_k", f"{gcfg.sampling.top_k} exceeds the vocabulary ({cfg.vocab_size})")
        if gcfg.prefill_only:  # stop at the deepest hooked layer: the rest of the model is never run
            depth = layers_needed(gcfg.prefill_hooks)
            cfg = dataclasses.replace(cfg, n_layers=depth)
            params = {**params, "layers": tuple(params["layers"][:depth])}
        self.placement = Placement(cfg, mesh) if mesh is not None else None
        self.tail_pool = gcfg.tail_pool
        self.narrow = gcfg.narrow_width
        if self.placement is not None:
            self.placement.check_rows("batch_size", gcfg.batch_size)
            self.placement.check_rows("decode_slots", gcfg.pool_slots)
            if gcfg.tail_slots is None:  # the default tail pool is rounded down to split over `data`
                self.tail_pool -= self.tail_pool % self.placement.data
            elif gcfg.tail_slots:
                self.placement.check_rows("tail_slots", gcfg.tail_slots)
            if gcfg.narrow_lanes is None:  # likewise the default narrow call
                self.narrow -= self.narrow % self.placement.data
            elif gcfg.narrow_lanes:
                self.placement.check_rows("narrow_lanes", gcfg.narrow_lanes)
            params = self.placement.put_params(params)
            edit_params = None if edit_params is None else self.placement.replicated(edit_params)
        # the fewest prompts a prefill round waits for while others decode: a narrow call moves them as
        # cheaply per lane as a full one, and the pool's freed slots fill again sooner
        self.round_lanes = self.narrow or gcfg.batch_size
        params = with_stacked(params, keep_layers=not gcfg.prefill_only)  # prefill scans it; decode reads "layers"
        if self.placement is not None:
            params = self.placement.put_params(params)  # pins the stack's propagated sharding
        self.cfg, self.params, self.gcfg, self.edit_params = cfg, params, gcfg, edit_params
        self.dcfg = DecodeConfig(gcfg.max_new_tokens, gcfg.sampling, gcfg.fixed_length, gcfg.decode_hooks, gcfg.edit)
        rules = StopRules(tuple(eos_ids), tuple(gcfg.stop_strings), token_bytes)
        self.tables = StopTables(*rules.tables(cfg.vocab_size))
        if self.placement is not None:
            self.tables = self.placement.replicated(self.tables)
        self.timings = {
            "prefill_seconds": 0.0,
            "prefill_calls": 0,
            "narrow_prefill_calls": 0,  # calls `narrow_lanes` wide
            "decode_seconds": 0.0,
            "decode_steps": 0,
            "tail_steps": 0,  # decode steps in the small tail pool
            "shared_prompt_tokens": 0,  # prompt tokens copied from another slot's cache, not prefilled
        }
        self._state: SlotState | None = None
        self._make_empty = None

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
        if g.prefill_only:
            yield from self._stream_prefill_only(state, queue)
            return
        n_slots = g.decode_slots
        occupant: list[InFlight | None] = [None] * n_slots  # prefilling or decoding
        live: set[int] = set()  # slots decoding
        lanes = self._lanes(queue)
        while queue or any(occupant):
            self._admit(queue, occupant, lanes)
            state, started = self._prefill(state, lanes, more_coming=bool(queue), decoding=bool(live))
            live.update(seq.slot for seq in started)
            # `occupant` holds these; the list would keep those that finish alive, activations and all, through
            # the next round (a wave of short answers finishing together: twice the pool's prompts on the host)
            del started
            if not live:
                continue
            if not queue and not lanes.busy and not lanes.pending and len(live) <= self.tail_pool < len(occupant):
                state, occupant, live = self._shrink(state, occupant, live)
                n_slots = len(occupant)
            need = self._slots_wanted(queue, occupant, lanes) if queue else n_slots + 1
            t0 = time.perf_counter()
            with self._on_mesh():
                state, steps = decode_segment(
                    self.cfg,
                    self.dcfg,
                    self.params,
                    state,
                    self.tables,
                    g.segment_steps,
                    n_slots - len(live) + need,
                    self.edit_params,
                )
            steps, active, num_generated, stop_reason, logprob = jax.device_get(
                (steps, state.active, state.num_generated, state.stop_reason, state.logprob)
            )
            self.timings["decode_seconds"] += time.perf_counter() - t0
            self.timings["decode_steps"] += int(steps)
            self.timings["tail_steps"] += int(steps) if n_slots < g.decode_slots else 0
            for slot in sorted(live):
                if not active[slot]:
                    seq, occupant[slot] = occupant[slot], None
                    live.discard(slot)
                    tokens, acts = jax.device_get(read_slot(state, slot))
                    n = int(num_generated[slot])
                    yield Finished(
                        seq.sequence_id,
                        len(seq.prompt),
                        np.asarray(tokens[:n]),
                        int(stop_reason[slot]),
                        float(logprob[slot]),
                        seq.prompt_acts(),
                        {k: self._on_host(a[:n]) for k, a in acts.items()},
                    )
        self._state = state if n_slots == g.decode_slots else None

    def _stream_prefill_only(self, state: SlotState, queue: collections.deque) -> Iterator[Finished]:
        """Each lane owns a slot: a prompt is admitted, prefilled chunk by chunk, and finished."""
        occupant: list[InFlight | None] = [None] * self.gcfg.pool_slots
        lanes = self._lanes(queue)
        while queue or any(occupant):
            self._admit(queue, occupant, lanes)
            state, started = self._prefill(state, lanes, more_coming=bool(queue), decoding=False)
            while started:  # popped, so a finished prompt's activations go with it, not at the next round
                seq = started.pop(0)
                occupant[seq.slot] = None
                acts = seq.prompt_acts()
                yield Finished(seq.sequence_id, len(seq.prompt), np.zeros(0, np.int32), STOP_NONE, 0.0, acts, {})
        self._state = state

    def _lanes(self, queue: collections.deque) -> Lanes:
        """Empty prefill lanes for a stream of `queue`, counting its copies of each prompt when they share."""
        lanes = Lanes(self.gcfg.batch_size)
        if self.gcfg.share_prefixes:
            lanes.queued.update(s.key for s in queue)
        return lanes

    def _admit(self, queue: collections.deque, occupant: list, lanes: Lanes) -> None:
        """Free slots take the next prompts in order. A prompt that can copy a prefix from one in flight
        waits for that donor's cache instead of a lane (lanes.pending)."""
        for slot in range(len(occupant)):
            if occupant[slot] is None and queue:
                occupant[slot] = seq = queue.popleft()
                seq.slot = slot
                if self.gcfg.share_prefixes:
                    lanes.queued[seq.key] -= 1
                    choose_donor(seq, [o for o in occupant if o is not None], self.gcfg.prefill_chunk)
                (lanes.pending if seq.donor is not None else lanes.waiting).append(seq)

    def _slots_wanted(self, queue: collections.deque, occupant: list, lanes: Lanes) -> int:
        """Free slots to stop decoding for: as many as a round of prefill lacks (`round_lanes`), but just
        one when the next prompt needs no call of its own: a copy of a prompt in flight starts at once
        (prefill.fork), and one followed by enough queued copies makes up a round by itself."""
        short, head = lanes.short_of(self.round_lanes), queue[0]
        if short and self.gcfg.share_prefixes:
            if lanes.queued[head.key] >= short or any(o is not None and o.key == head.key for o in occupant):
                return 1
        return min(short, len(queue))

    def _fork(self, state: SlotState, lanes: Lanes) -> tuple[SlotState, list[InFlight]]:
        """Copy the donors' caches into the slots of pending prompts whose donor now covers the shared
        prefix (prefill.fork). Partly shared prompts then prefill the rest in a lane; identical ones are
        armed at once. Returns the state and the prompts done with prefill (now decoding)."""
        g, done = self.gcfg, []
        while ready := [s for s in lanes.pending if s.can_fork(g.prefill_chunk)]:
            for i in range(0, len(ready), g.batch_size):
                group = ready[i : i + g.batch_size]
                if not (g.prefill_only and all(s.whole_shared for s in group)):  # else nothing needs a cache
                    m = g.batch_size
                    pad = m - len(group)
                    with self._on_mesh():
                        state = fork(
                            state,
                            np.array([s.donor.slot for s in group] + [0] * pad, np.int32),
                            np.array([s.slot for s in group] + [g.pool_slots] * pad, np.int32),
                            np.array([s.whole_shared and not g.prefill_only for s in group] + [False] * pad),
                            np.array([len(s.prompt) for s in group] + [0] * pad, np.int32),
                            np.array([s.sequence_id for s in group] + [0] * pad, np.uint32),
                            g.seed,
                        )
                for s in group:
                    s.forked = True
                    lanes.pending.remove(s)
                    self.timings["shared_prompt_tokens"] += s.shared
                    if s.whole_shared:
                        done.append(s)
                    else:
                        s.next_chunk = s.shared // g.prefill_chunk
                        lanes.waiting.append(s)
        return state, done

    def _shrink(self, state: SlotState, occupant: list, live: set[int]):
        """Move the live rows into a pool of `tail_slots` slots for the end of the stream."""
        old = sorted(live)
        n = self.tail_pool
        slots = np.array(old + [old[0]] * (n - len(old)), np.int32)
        with self._on_mesh():
            state = compact(state, slots, np.arange(n) < len(old))
        small = [occupant[i] for i in old] + [None] * (n - len(old))
        for i, seq in enumerate(small[: len(old)]):
            seq.slot = i
        return state, small, set(range(len(old)))

    def _check(self, sequence_id, prompt) -> InFlight:
        ids = np.asarray(prompt, np.int32).reshape(-1)
        if not len(ids):
            raise ValueError(f"sequence {sequence_id}: empty prompt")
        if len(ids) > self.gcfg.max_prompt_len:
            raise ValueError(
                f"sequence {sequence_id}: prompt of {len(ids)} tokens exceeds max_prompt_len={self.gcfg.max_prompt_len}"
            )
        return InFlight(int(sequence_id), ids, -1, prompt_key(ids))

    def _empty_state(self) -> SlotState:
        if self._make_empty is None:
            g = self.gcfg
            dtype, n_stop = self.params["embed"].dtype, self.tables.num_strings
            args = (self.cfg, g.pool_slots, g.cache_len, g.max_new_tokens, g.decode_hooks, n_stop, dtype)
            # one program (run eagerly, each zeros array and the keys were programs of their own to compile),
            # shared by generators of the same shapes; on a mesh, built in place: no [N, ...] array is ever
            # whole on one device
            make = functools.partial(empty_state, *args)
            self._make_empty = (
                functools.partial(EMPTY_STATE, *args)
                if self.placement is None
                else jax.jit(make, out_shardings=self.placement.state_shardings(jax.eval_shape(make)))
            )
        return self._make_empty()

    def _on_mesh(self):
        """The mesh as the programs' context: they pin their outputs to it (sharding.constrain_state)."""
        return contextlib.nullcontext() if self.placement is None else jax.set_mesh(self.placement.mesh)

    def _call_rows(self, lanes: Lanes) -> tuple[int, list[list[int]]]:
        """(call width, the lanes of each prefill call of this round): every lane in one call, or when few
        are busy, the busy ones in calls `narrow` wide (as long as they add up to at most half the full
        width; short lists are padded with idle rows). Lanes keep their prompts either way."""
        busy = [r for r, seq in enumerate(lanes.seqs) if seq is not None]
        w = self.narrow
        if w and -(-len(busy) // w) * w <= lanes.size // 2:
            return w, [busy[i : i + w] for i in range(0, len(busy), w)]
        return lanes.size, [list(range(lanes.size))]

    def _prefill_call(self, state: SlotState, width: int, seqs: list) -> tuple[SlotState, list[InFlight], tuple]:
        """One prefill call `width` lanes wide: lane r carries seqs[r]'s next chunk (None, or past the list:
        idle). Returns the state, the prompts whose last chunk it ran, and its activations still on the
        device with where their rows go (for `_land`)."""
        g, c = self.gcfg, self.gcfg.prefill_chunk
        slot = np.full(width, g.pool_slots, np.int32)
        tokens = np.zeros((width, c), np.int32)
        start = np.zeros(width, np.int32)
        n_valid = np.zeros(width, np.int32)
        ids = np.zeros(width, np.uint32)
        last = np.zeros(width, bool)
        placed = []  # (sequence, lane, first prompt row, rows)
        for r, seq in enumerate(seqs):
            if seq is None:
                continue
            begin = seq.next_chunk * c
            piece = seq.prompt[begin : begin + c]
            slot[r], start[r], n_valid[r], ids[r] = seq.slot, begin, len(piece), seq.sequence_id
            tokens[r, : len(piece)] = piece
            placed.append((seq, r, begin, len(piece)))
            seq.next_chunk += 1
            last[r] = begin + c >= len(seq.prompt)
        chunk = PrefillChunk(slot, tokens, start, n_valid, last, ids, np.uint32(g.seed))
        if self.placement is not None:
            chunk = self.placement.put_chunk(chunk)
        with self._on_mesh():
            state, acts = prefill_chunk(
                self.cfg, g.prefill_hooks, self.params, state, chunk, not g.prefill_only, g.edit, self.edit_params
            )
        self.timings["prefill_calls"] += 1
        self.timings["narrow_prefill_calls"] += width < g.batch_size
        return state, [seq for seq, done in zip(seqs, last) if done], (acts, placed)

    def _land(self, call: tuple | None) -> None:
        """Move one prefill call's activations to the host, straight into their prompts' arrays. Called
        once the next call is queued, so the device is never idle for it, and at most two calls'
        activations are ever on the device: a round's memory does not grow with its prompts."""
        if call is None:
            return
        acts, placed = call
        host = jax.device_get(acts)  # hook name -> [width, chunk, d]
        for seq, r, begin, n in placed:
            for h in self.gcfg.prefill_hooks:
                seq.land(h.name, begin, self._on_host(host[h.name][r, :n]))

    def _on_host(self, acts: np.ndarray) -> np.ndarray:
        """Activations as the host keeps them: `acts_dtype`, or the model's."""
        return np.asarray(acts) if self.gcfg.acts_dtype is None else cast(acts, self.gcfg.acts_dtype)

    def _prefill(
        self, state: SlotState, lanes: Lanes, more_coming: bool, decoding: bool
    ) -> tuple[SlotState, list[InFlight]]:
        """Run prefill calls while at least `round_lanes` lanes have a chunk to do: a lane whose prompt is
        done takes the next waiting one, and a half-prefilled prompt keeps its lane until the next round.
        Emptier rounds run only when no more prompts will come, when nothing is decoding (else nothing
        could progress), or when the prompts they carry also hold back enough others (copies of their
        prefixes, pending or still queued) to make up the round: 8 samples of one prompt ride on one lane.
        Returns the state and the prompts that finished prefill (now decoding)."""
        t0 = time.perf_counter()
        started, in_flight = [], None  # in_flight: the last call issued (its activations land after the next)
        while True:
            state, forked = self._fork(state, lanes)
            started += forked
            lanes.refill()
            if lanes.busy == 0 or (lanes.short_of(self.round_lanes) and more_coming and (decoding or started)):
                break  # a part-empty call waits for more prompts, unless none will come or nothing else can run
            width, calls_rows = self._call_rows(lanes)
            for rows in calls_rows:
                state, finished, call = self._prefill_call(state, width, [lanes.seqs[r] for r in rows])
                self._land(in_flight)
                in_flight = call
                started += finished
            lanes.seqs = [None if seq in started else seq for seq in lanes.seqs]
        self._land(in_flight)
        for seq in [*started, *lanes.waiting, *lanes.seqs]:  # every call has landed: donors' rows are all here
            if seq is not None:
                seq.settle()
        if in_flight is not None:  # some call ran
            self.timings["prefill_seconds"] += time.perf_counter() - t0
        return state, started
