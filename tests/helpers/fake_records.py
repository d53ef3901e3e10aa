"""Deterministic fake sequences for store/writer/data tests (shared helper, not a test module)."""

from __future__ import annotations

import numpy as np

from harvest.store.shard import SequenceRecord

HOOKS = {"blocks.0.hook_resid_post": 16, "blocks.1.mlp.hook_post": 24}


def fake_record(
    sid: int, n_prefill: int = 7, n_decode: int = 5, hooks=None, dtype=np.float32, extra: dict | None = None
) -> SequenceRecord:
    """A sequence whose every value is a function of sid, so a reader can recompute it."""
    hooks = hooks or HOOKS
    rng = np.random.default_rng(sid)
    n = n_prefill + n_decode
    tokens = {
        "token_id": rng.integers(0, 150_000, n).astype(np.int32),
        "position": np.arange(n, dtype=np.int32),
        "phase": np.array([0] * n_prefill + [1] * n_decode, dtype=np.int8),
        "segment": rng.integers(0, 5, n).astype(np.int8),
        "example": rng.integers(-1, 4, n).astype(np.int16),
        "row": rng.integers(-1, 30, n).astype(np.int16),
        "col": rng.integers(-1, 30, n).astype(np.int16),
    }
    acts = {h: (rng.standard_normal((n, w)) * 3).astype(dtype) for h, w in hooks.items()}
    meta = {
        "sequence_id": sid,
        "task_id": f"task{sid % 7:03d}",
        "test_index": sid % 2,
        "augmentation": {"rot": sid % 4, "perm": [1, 0]},
        "sample_index": 0,
        "prompt_length": n_prefill,
        "generated_length": n_decode,
        "stop_reason": "eos",
        "generated_text": f"out é {sid}\n[[1, 2]]",
        "parsed_ok": bool(sid % 2),
        "pred_h": 2,
        "pred_w": 3,
        "pixel_accuracy": sid / 100,
        "correct": sid % 3 == 0,
    }
    meta.update(extra or {})
    return SequenceRecord(meta, tokens, acts)
