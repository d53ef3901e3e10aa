"""Batched generation on the host side: bucket, pad, prefill, decode.

    gen = Generator(lm.cfg, lm.params, GenerateConfig(batch_size=8, max_new_tokens=64), eos_ids=lm.eos_ids)
    out = gen.generate([[...ids...], [...ids...]], sequence_ids=[0, 1]).to_host()

Shapes are static per bucket: the batch is always `batch_size` rows (filler rows start stopped)
and prompts are right-padded to the smallest bucket that fits, so a second batch in the same
bucket reuses the compiled prefill and decode.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from harvest.engine.config import ModelConfig
from harvest.engine.decode import DecodeConfig, decode
from harvest.engine.hooks import Hook
from harvest.engine.prefill import prefill
from harvest.engine.sampling import SamplingConfig, row_keys
from harvest.engine.stopping import StopRules
from harvest.errors import FieldError

# Multiples of 128 above 128 so attention blocks divide them; ~1.25-1.5x apart, since prefill is
# compute-bound and padding is paid at full price.
DEFAULT_BUCKETS = (
    64,
    128,
    256,
    384,
    512,
    768,
    1024,
    1280,
    1536,
    2048,
    2560,
    3072,
    4096,
    5120,
    6144,
    7168,
    8192,
    9216,
    10240,
)


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    batch_size: int = 8
    max_new_tokens: int = 64
    sampling: SamplingConfig = SamplingConfig()
    fixed_length: bool = False  # every row generates exactly max_new_tokens: EOS and stop strings are ignored
    stop_strings: tuple[str, ...] = ()
    seed: int = 0
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    attention_chunk: int = 512  # prefill attention block; memory is O(B*H*chunk^2)
    prefill_hooks: tuple[Hook, ...] = ()
    decode_hooks: tuple[Hook, ...] = ()

    def __post_init__(self):
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"{getattr(self, name)} is impossible; it must be >= 1")
        if not 0 <= self.seed < 2**32:
            raise FieldError("seed", f"{self.seed} is impossible; it must be in [0, 2**32)")
        if not all(self.stop_strings):
            raise FieldError("stop_strings", "must be non-empty strings: an empty one would stop every row at once")
        if self.attention_chunk < 16 or self.attention_chunk & (self.attention_chunk - 1):
            raise FieldError(
                "attention_chunk", f"{self.attention_chunk} is impossible; it must be a power of two >= 16"
            )
        if not self.buckets or min(self.buckets) < 1:
            raise FieldError("buckets", f"{list(self.buckets)} is impossible; it must be non-empty, all >= 1")
        odd = [b for b in self.buckets if b > self.attention_chunk and b % 128]
        if odd:  # the flash-style prefill splits a long bucket into equal power-of-two blocks
            raise FieldError(
                "buckets", f"buckets above attention_chunk={self.attention_chunk} must be multiples of 128: {odd}"
            )

    def bucket_for(self, length: int) -> int:
        for b in sorted(self.buckets):
            if b >= length:
                return b
        raise ValueError(f"prompt of {length} tokens exceeds the largest bucket {max(self.buckets)}")


@dataclasses.dataclass
class BatchOutput:
    """One batch's results. Arrays stay on device until `to_host`, so the caller can hand them to
    a writer thread and dispatch the next batch meanwhile."""

    rows: int  # real rows (the first `rows` of the batch)
    tokens: jax.Array  # [B, T]
    num_generated: jax.Array  # [B]
    stop_reason: jax.Array  # [B]
    logprob: jax.Array  # [B]
    prefill_acts: dict[str, jax.Array]  # name -> [B, P, width]
    decode_acts: dict[str, jax.Array]  # name -> [B, T, width]

    def to_host(self) -> BatchOutput:
        get = lambda x: np.asarray(jax.device_get(x))[: self.rows]  # noqa: E731
        return BatchOutput(
            self.rows,
            get(self.tokens),
            get(self.num_generated),
            get(self.stop_reason),
            get(self.logprob),
            {k: get(v) for k, v in self.prefill_acts.items()},
            {k: get(v) for k, v in self.decode_acts.items()},
        )

    def generated(self, row: int) -> np.ndarray:
        return np.asarray(self.tokens[row][: int(self.num_generated[row])])


class Generator:
    def __init__(self, cfg: ModelConfig, params, gcfg: GenerateConfig, *, eos_ids=(), token_bytes=None):
        if gcfg.sampling.top_k > cfg.vocab_size:
            raise FieldError("top_k", f"{gcfg.sampling.top_k} exceeds the vocabulary ({cfg.vocab_size})")
        self.cfg, self.params, self.gcfg = cfg, params, gcfg
        self.dcfg = DecodeConfig(gcfg.max_new_tokens, gcfg.sampling, gcfg.fixed_length, gcfg.decode_hooks)
        rules = StopRules(tuple(eos_ids), tuple(gcfg.stop_strings), token_bytes)
        self.is_eos, self.stop_table, self.stop_lengths = rules.tables(cfg.vocab_size)

    def generate(self, prompts: list[list[int]], sequence_ids: list[int]) -> BatchOutput:
        g = self.gcfg
        n = len(prompts)
        if not 0 < n <= g.batch_size:
            raise ValueError(f"got {n} prompts for a batch of {g.batch_size}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        lengths = np.array([len(p) for p in prompts] + [1] * (g.batch_size - n), np.int32)
        bucket = g.bucket_for(int(lengths.max()))
        tokens = np.zeros((g.batch_size, bucket), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        active = np.arange(g.batch_size) < n
        ids = np.array(list(sequence_ids) + [0] * (g.batch_size - n), np.uint32)
        cache, logits, prefill_acts = prefill(
            self.cfg,
            self.params,
            jnp.asarray(tokens),
            jnp.asarray(lengths),
            hooks=g.prefill_hooks,
            cache_len=bucket + g.max_new_tokens,
            max_chunk=g.attention_chunk,
        )
        out = decode(
            self.cfg,
            self.dcfg,
            self.params,
            cache,
            logits,
            jnp.asarray(lengths),
            jnp.asarray(active),
            row_keys(g.seed, ids),
            self.is_eos,
            self.stop_table,
            self.stop_lengths,
            prompt_len=bucket,
        )
        return BatchOutput(
            n, out["tokens"], out["num_generated"], out["stop_reason"], out["logprob"], prefill_acts, out["acts"]
        )
