"""Static model description: a frozen dataclass read from a Hugging Face Qwen2 config.json.

Only Qwen2-family decoders are supported. Everything the forward pass needs is here, so the
jitted functions can take it as a static (hashable) argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from harvest.errors import HarvestError

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
SUPPORTED_MODEL_TYPES = ("qwen2",)


class ModelError(HarvestError, ValueError):
    """A checkpoint or model description that harvest cannot use. The message is one line."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    rope_theta: float
    rms_norm_eps: float
    tie_embeddings: bool
    max_position_embeddings: int = 32768

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read a config.json dict. Refuses anything that is not a Qwen2 decoder."""
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        if model_type not in SUPPORTED_MODEL_TYPES or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
            found = ",".join(archs) or model_type or "unknown"
            raise ModelError(
                f"unsupported architecture {found!r}: harvest supports {', '.join(SUPPORTED_ARCHITECTURES)} "
                f"(model_type {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if hf.get("use_sliding_window"):
            raise ModelError("use_sliding_window=true is not supported (Qwen2 checkpoints ship it false)")
        n_heads = int(hf["num_attention_heads"])
        d_model = int(hf["hidden_size"])
        head_dim = int(hf.get("head_dim") or d_model // n_heads)
        return cls(
            vocab_size=int(hf["vocab_size"]),
            d_model=d_model,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            d_mlp=int(hf["intermediate_size"]),
            rope_theta=rope_theta_of(hf),
            # Qwen2 uses 1e-6; transformers' own default is 1e-6 too. Never fall back to 1e-5.
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        )


def rope_theta_of(hf: dict[str, Any]) -> float:
    """rope_theta lives at the top level in transformers 4 and under `rope_parameters` in 5."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ModelError(f"rope type {kind!r} is not supported; harvest implements the default Qwen2 RoPE")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        theta = 1_000_000.0  # the Qwen2 value; 10000 here would silently corrupt every position
    return float(theta)


# Small random-initialised presets for the offline demo and tests. They use the real Qwen2
# tokenizer, so their vocabulary is the real one.
PRESETS: dict[str, dict[str, Any]] = {
    # name: (hidden, layers, heads, kv heads, mlp); the real Qwen2 vocabulary, tied embeddings
    name: dict(
        vocab_size=151936,
        hidden_size=d,
        num_hidden_layers=n,
        num_attention_heads=h,
        num_key_value_heads=k,
        intermediate_size=f,
        tie_word_embeddings=True,
    )
    for name, (d, n, h, k, f) in {
        "tiny": (64, 4, 4, 2, 128),
        "small": (256, 8, 8, 2, 704),
        "0.5b": (896, 24, 14, 2, 4864),  # the Qwen2.5-0.5B shape, for benchmarks without real weights
        "1.5b": (1536, 28, 12, 2, 8960),  # the Qwen2.5-1.5B shape (GPU benchmarks)
    }.items()
}


def preset_hf_config(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ModelError(f"unknown random preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        bos_token_id=151643,
        eos_token_id=151643,
        **PRESETS[name],
    )  # a base model: random weights follow no chat
