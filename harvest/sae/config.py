"""The SAE training config: YAML -> frozen dataclasses, validated key by key with one-line errors.

Every key is documented in configs/sae-demo.yaml and docs/SAE.md. It is read the way the run config
is (harvest.cli.config: the same type checks, the same `--set section.key=value` overrides), into its
own sections: data, sae, train, output, runtime.

A resumed training must use the config it started with, except for RESUMABLE_KEYS (logging,
checkpoint cadence, the device mesh, progress): every other key changes the weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from pathlib import Path
from typing import Any, Literal

from harvest.cli.config import ConfigError, _check_type, apply_overrides, expand_paths, flatten, read_yaml

__all__ = [
    "ConfigError",
    "DataSection",
    "SAESection",
    "TrainSection",
    "OutputSection",
    "RuntimeSection",
    "TrainConfig",
    "from_dict",
    "load",
    "RESUMABLE_KEYS",
]

ARCHITECTURES = ("topk", "batchtopk", "transcoder")


@dataclasses.dataclass(frozen=True)
class DataSection:
    store: str = "outputs/demo"  # run folder written by `harvest run`
    hook: str | None = None  # topk / batchtopk: the hook to reconstruct
    hook_in: str | None = None  # transcoder: the hook encoded ...
    hook_out: str | None = None  # ... and the hook predicted, on the same token rows
    phase: Literal["prefill", "decode"] | None = None  # null: both
    segment: list[str] | None = None  # ARC segment names (docs/ARC.md); null: all
    exclude: list[Literal["first_token", "outliers"]] = dataclasses.field(default_factory=lambda: ["first_token"])
    eval_fraction: float = 0.1  # of SEQUENCES, held out by sequence-id hash: training never sees them
    eval_tokens: int = 16384  # held-out rows evaluated (an evenly spaced subset if there are more)
    buffer_chunks: int = 16  # loader mixing buffer (docs/TRAINING.md)

    def __post_init__(self):
        expand_paths(self, "store")

    @property
    def hooks(self) -> tuple[str, str]:
        """(input hook, output hook): the same hook twice for an SAE."""
        return (self.hook_in, self.hook_out) if self.hook is None else (self.hook, self.hook)


@dataclasses.dataclass(frozen=True)
class SAESection:
    architecture: Literal[ARCHITECTURES] = "topk"
    d_sae: int | None = None  # latents; null: expansion x d_in
    expansion: int = 8
    k: int = 32  # active latents per token (batchtopk: on average over the batch)
    k_aux: int | None = None  # dead latents in the AuxK loss; null: d_out // 2 (Gao et al.)
    normalize: Literal["scale", "none"] = "scale"  # scale: x * sqrt(d) / E|x| from the store's statistics
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    init_tokens: int = 8192  # training rows sampled for b_dec's initialisation


@dataclasses.dataclass(frozen=True)
class TrainSection:
    batch_size: int = 4096  # tokens per step, over all devices
    steps: int | None = None  # give steps or tokens
    tokens: int | None = None  # steps = tokens // batch_size
    lr: float | None = None  # null: 2e-4 / sqrt(d_sae / 2**14) (Gao et al.'s fit)
    warmup_steps: int = 1000  # linear warmup from 0
    decay_steps: int | None = None  # linear decay to 0 over the last steps; null: the last 20%
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 6.25e-10
    max_grad_norm: float | None = None  # null: no clipping
    aux_coefficient: float = 0.03125  # AuxK loss weight (Gao et al.: 1/32)
    dead_tokens: int = 10_000_000  # a latent not fired in this many training tokens is dead
    threshold_lr: float = 0.01  # batchtopk: EMA rate of the inference threshold
    seed: int = 0  # weights' init and the data order
    log_every: int = 100  # steps per metrics line
    eval_every: int | None = None  # steps between held-out evaluations; null: at the end only
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    spliced_sequences: int = 0  # held-out sequences run through the spliced model at the end (0: off)


@dataclasses.dataclass(frozen=True)
class OutputSection:
    path: str = "outputs/sae"
    saelens: bool = True  # also write SAELens' cfg.json + sae_weights.safetensors (topk, batchtopk)

    def __post_init__(self):
        expand_paths(self, "path")


@dataclasses.dataclass(frozen=True)
class RuntimeSection:
    mesh: dict = dataclasses.field(default_factory=lambda: {"data": -1})  # axis -> size; -1: the rest
    compile_cache: str | None = "~/.cache/harvest/jax"  # persistent XLA cache; null disables
    progress: bool = True

    def __post_init__(self):
        expand_paths(self, "compile_cache")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data: DataSection = DataSection()
    sae: SAESection = SAESection()
    train: TrainSection = TrainSection()
    output: OutputSection = OutputSection()
    runtime: RuntimeSection = RuntimeSection()

    def __post_init__(self):
        d, s, t = self.data, self.sae, self.train
        if s.architecture == "transcoder":
            if d.hook is not None or not (d.hook_in and d.hook_out):
                raise ConfigError("data.hook_in, data.hook_out: a transcoder needs both (and no data.hook)")
        elif d.hook is None or d.hook_in is not None or d.hook_out is not None:
            raise ConfigError(f"data.hook: sae.architecture {s.architecture} needs it (hook_in/hook_out: transcoder)")
        if (t.steps is None) == (t.tokens is None):
            raise ConfigError("train.steps, train.tokens: give exactly one of them")
        if self.total_steps < 1:
            raise ConfigError(f"train.tokens: {t.tokens} is fewer than one batch of {t.batch_size}; raise it")
        if t.warmup_steps + self.decay_steps > self.total_steps:
            raise ConfigError(
                f"train.warmup_steps: {t.warmup_steps} + decay {self.decay_steps} exceed the {self.total_steps} "
                "steps; lower train.warmup_steps or train.decay_steps"
            )

    @property
    def total_steps(self) -> int:
        return self.train.steps if self.train.steps is not None else self.train.tokens // self.train.batch_size

    @property
    def decay_steps(self) -> int:
        t = self.train
        return t.decay_steps if t.decay_steps is not None else self.total_steps // 5

    def d_sae(self, d_in: int) -> int:
        return self.sae.d_sae if self.sae.d_sae is not None else self.sae.expansion * d_in

    def lr(self, d_sae: int) -> float:
        # Gao et al. (2024), fig. 4: the best lr falls as 1/sqrt(latents), 2e-4 at 2**14
        return self.train.lr if self.train.lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = typing.get_type_hints(TrainConfig)

# Keys that never change the weights: a resumed training may change them (anything else is refused).
RESUMABLE_KEYS = frozenset(
    {
        "train.log_every",
        "train.eval_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.spliced_sequences",
        "data.eval_tokens",
        "output.path",
        "output.saelens",
        "runtime.progress",
        "runtime.compile_cache",
        "runtime.mesh",  # other float summation orders; the same training otherwise
    }
)

_POSITIVE = ">= 1"
# key -> (what a value must satisfy, how the error message says it)
_CHECKS = {
    "data.eval_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.eval_tokens": (lambda v: v >= 0, ">= 0"),
    "data.buffer_chunks": (lambda v: v >= 1, _POSITIVE),
    "data.segment": (lambda v: v is None or len(v) >= 1, "null or a non-empty list"),
    "sae.d_sae": (lambda v: v is None or v >= 1, "null or >= 1"),
    "sae.expansion": (lambda v: v >= 1, _POSITIVE),
    "sae.k": (lambda v: v >= 1, _POSITIVE),
    "sae.k_aux": (lambda v: v is None or v >= 1, "null or >= 1"),
    "sae.init_tokens": (lambda v: v >= 1, _POSITIVE),
    "train.batch_size": (lambda v: v >= 1, _POSITIVE),
    "train.steps": (lambda v: v is None or v >= 1, "null or >= 1"),
    "train.tokens": (lambda v: v is None or v >= 1, "null or >= 1"),
    "train.lr": (lambda v: v is None or v > 0, "null or > 0"),
    "train.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "train.decay_steps": (lambda v: v is None or v >= 0, "null or >= 0"),
    "train.b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.eps": (lambda v: v > 0, "> 0"),
    "train.max_grad_norm": (lambda v: v is None or v > 0, "null or > 0"),
    "train.aux_coefficient": (lambda v: v >= 0, ">= 0"),
    "train.dead_tokens": (lambda v: v >= 1, _POSITIVE),
    "train.threshold_lr": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "train.seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "train.log_every": (lambda v: v >= 1, _POSITIVE),
    "train.eval_every": (lambda v: v is None or v >= 1, "null or >= 1"),
    "train.checkpoint_every": (lambda v: v >= 1, _POSITIVE),
    "train.keep_checkpoints": (lambda v: v >= 1, _POSITIVE),
    "train.spliced_sequences": (lambda v: v >= 0, ">= 0"),
}


def _check_mesh(value: Any) -> dict[str, int]:
    """runtime.mesh: {axis: size} over the axes data (required) and model; one size may be -1."""
    if not isinstance(value, dict):
        raise ConfigError(f"runtime.mesh: expected a mapping like {{data: -1}}, got {type(value).__name__} {value!r}")
    bad = [a for a in value if a not in ("data", "model")]
    if bad or "data" not in value:
        raise ConfigError(f"runtime.mesh: axes are data (required) and model; got {', '.join(map(str, value))}")
    for axis, size in value.items():
        if isinstance(size, bool) or not isinstance(size, int) or not (size >= 1 or size == -1):
            raise ConfigError(f"runtime.mesh.{axis}: {size!r} is impossible; it must be >= 1, or -1 for the rest")
    if list(value.values()).count(-1) > 1:
        raise ConfigError("runtime.mesh: at most one axis may be -1")
    return dict(value)


def from_dict(raw: dict | None) -> TrainConfig:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a mapping of sections (data, sae, train, output, runtime)")
    sections = {}
    for name, value in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"unknown section {name!r}; sections are {', '.join(_SECTIONS)}")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {type(value).__name__} {value!r}")
        cls = _SECTIONS[name]
        fields = typing.get_type_hints(cls)
        kwargs = {}
        for key, v in value.items():
            full = f"{name}.{key}"
            if key not in fields:
                raise ConfigError(f"unknown key {full!r}; {name} has {', '.join(fields)}")
            kwargs[key] = _check_mesh(v) if full == "runtime.mesh" else _check_type(full, v, fields[key])
            ok, rule = _CHECKS.get(full, (None, None))
            if ok is not None and not ok(kwargs[key]):
                raise ConfigError(f"{full}: {v!r} is impossible; it must be {rule}")
        sections[name] = cls(**kwargs)
    return TrainConfig(**sections)


def load(path: str | os.PathLike, overrides: list[str] = ()) -> TrainConfig:
    if not Path(path).is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist; give a YAML training config (configs/sae-demo.yaml)"
        )
    raw = read_yaml(path)
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, sae, train, ...), got a {type(raw).__name__}")
    return from_dict(apply_overrides(raw, list(overrides)))


def _resumable(key: str) -> bool:
    return key in RESUMABLE_KEYS or key.startswith("runtime.mesh.")  # flatten() splits the mesh mapping


def changed_keys(old: dict, new: TrainConfig) -> list[str]:
    """Weight-changing keys whose values differ between a saved config dict and `new`: `key: old -> new`."""
    before = {k: v for k, v in flatten(old).items() if not _resumable(k)}
    after = {k: v for k, v in flatten(json.loads(json.dumps(new.to_dict()))).items() if not _resumable(k)}
    missing = "absent"
    return [
        f"{k}: {before.get(k, missing)!r} -> {after.get(k, missing)!r}"
        for k in sorted(before.keys() | after.keys())
        if before.get(k, missing) != after.get(k, missing)
    ]
