"""The run config: YAML -> frozen dataclasses, validated key by key with one-line errors.

Every key is documented in configs/demo.yaml. `--set a.b=value` overrides parse values as YAML.
`data_fingerprint` covers every key that changes what lands on disk; resume refuses a change there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A bad config. The message is one line and names the key."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    path: str = "random:tiny"                                    # hub id | folder | .gguf | random:<preset>
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # compute dtype


@dataclasses.dataclass(frozen=True)
class DataSection:
    source: Literal["arc-agi-1", "arc-agi-2", "folder", "json", "hf"] = "arc-agi-1"
    split: Literal["training", "evaluation"] = "evaluation"
    path: Optional[str] = None           # folder / json file / hf dataset (path or hub id)
    solutions: Optional[str] = None      # Kaggle-style solutions file for source=json
    tasks: Optional[list[str]] = None    # task ids; null means all
    limit: Optional[int] = None          # after the seeded shuffle
    shuffle_seed: Optional[int] = None   # null keeps the dataset order
    max_prompt_tokens: int = 8192        # longer prompts are skipped and counted


@dataclasses.dataclass(frozen=True)
class PromptSection:
    format: Literal["digits", "spaced", "numbered"] = "digits"
    chat: Union[Literal["auto"], bool] = "auto"   # auto: the chat template iff the tokenizer has one
    system: Optional[str] = None
    user: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class AugmentSection:
    dihedral: bool = False        # also run the 7 non-identity dihedral transforms
    colors: int = 0               # colour permutations per test input
    keep_zero: bool = True        # keep colour 0 (background) fixed
    shuffle_demos: bool = False


@dataclasses.dataclass(frozen=True)
class GenerationSection:
    max_new_tokens: int = 1024
    ignore_eos: bool = False      # generate exactly max_new_tokens (equal work for benchmarks)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    samples: int = 1              # sequences per (task, test input, augmentation)
    seed: int = 0
    stop_strings: Union[Literal["auto"], list[str]] = "auto"   # auto: the prompt format's rule


@dataclasses.dataclass(frozen=True)
class CaptureSection:
    hooks: list[str] = dataclasses.field(default_factory=lambda: ["blocks.0.hook_resid_post"])
    phases: list[Literal["prefill", "decode"]] = dataclasses.field(default_factory=lambda: ["prefill", "decode"])
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"   # storage dtype
    codec: Literal["blosc-zstd", "zstd", "none"] = "blosc-zstd"
    shard_mb: float = 128.0      # activation MiB per shard: the write and commit unit


@dataclasses.dataclass(frozen=True)
class RuntimeSection:
    batch_size: int = 8
    buckets: Optional[list[int]] = None   # prompt length buckets; null uses the defaults
    attention_chunk: int = 512
    queue: int = 2                        # batches in flight to the writer (bounds host RAM)
    max_capture_gb: float = 8.0           # refuse settings whose capture buffers would exceed this
    compile_cache: Optional[str] = "~/.cache/harvest/jax"   # persistent XLA cache; null disables
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class OutputSection:
    path: str = "outputs/run"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    prompt: PromptSection = PromptSection()
    augment: AugmentSection = AugmentSection()
    generation: GenerationSection = GenerationSection()
    capture: CaptureSection = CaptureSection()
    runtime: RuntimeSection = RuntimeSection()
    output: OutputSection = OutputSection()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Keys that never change the stored data; everything else is part of the fingerprint.
NON_DATA_KEYS = {"capture.codec", "capture.shard_mb", "runtime.queue", "runtime.max_capture_gb", "runtime.progress",
                 "runtime.compile_cache",
                 "output.path"}

# key -> (what a value must satisfy, how the error message says it)
_CHECKS = {
    "data.limit": (lambda v: v is None or v >= 1, ">= 1"),
    "data.max_prompt_tokens": (lambda v: v >= 1, ">= 1"),
    "data.shuffle_seed": (lambda v: v is None or 0 <= v < 2**32, "null or in [0, 2**32)"),
    "augment.colors": (lambda v: v >= 0, ">= 0"),
    "generation.max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "generation.temperature": (lambda v: v >= 0, ">= 0"),
    "generation.top_k": (lambda v: v >= 0, ">= 0"),
    "generation.top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "generation.samples": (lambda v: v >= 1, ">= 1"),
    "generation.seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "generation.stop_strings": (lambda v: v == "auto" or all(v), "'auto' or a list of non-empty strings"),
    "capture.hooks": (lambda v: len(v) >= 1, "non-empty"),
    "capture.phases": (lambda v: len(v) >= 1 and len(set(v)) == len(v), "non-empty, no repeats"),
    "capture.shard_mb": (lambda v: v > 0, "> 0"),
    "runtime.batch_size": (lambda v: v >= 1, ">= 1"),
    "runtime.buckets": (lambda v: v is None or (len(v) >= 1 and all(b >= 1 for b in v)), "non-empty, all >= 1"),
    "runtime.attention_chunk": (lambda v: v >= 16 and v & (v - 1) == 0, "a power of two >= 16"),
    "runtime.queue": (lambda v: v >= 1, ">= 1"),
    "runtime.max_capture_gb": (lambda v: v > 0, "> 0"),
}


def _check_type(key: str, value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _check_type(key, value, arm)
            except ConfigError:
                if isinstance(value, list) and typing.get_origin(arm) is list:
                    raise  # the list was right; say which element was not
        raise ConfigError(f"{key}: {value!r} is not {_describe(tp)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null")
        return None
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool) != any(isinstance(a, bool) for a in typing.get_args(tp)):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        (arm,) = typing.get_args(tp)
        return [_check_type(f"{key}[{i}]", v, arm) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        hint = " (quote it: YAML reads 00576224 as a number)" if tp is str and isinstance(value, (int, float)) else ""
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}{hint}")
    return value


def _describe(tp) -> str:
    parts = []
    for arm in typing.get_args(tp):
        if typing.get_origin(arm) is Literal:
            parts += [repr(a) for a in typing.get_args(arm)]
        elif arm is type(None):
            parts.append("null")
        elif typing.get_origin(arm) is list:
            parts.append("a list")
        else:
            parts.append(getattr(arm, "__name__", str(arm)))
    return " or ".join(parts)


def from_dict(raw: dict | None) -> RunConfig:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a mapping of sections (model, data, prompt, ...)")
    sections = {}
    hints = typing.get_type_hints(RunConfig)
    for name, value in raw.items():
        if name not in hints:
            raise ConfigError(f"unknown section {name!r}; sections are {', '.join(hints)}")
        cls = hints[name]
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of keys")
        fields = typing.get_type_hints(cls)
        kwargs = {}
        for key, v in value.items():
            full = f"{name}.{key}"
            if key not in fields:
                raise ConfigError(f"unknown key {full!r}; {name} has {', '.join(fields)}")
            kwargs[key] = _check_type(full, v, fields[key])
            ok, rule = _CHECKS.get(full, (None, None))
            if ok is not None and not ok(kwargs[key]):
                raise ConfigError(f"{full}: {v!r} is impossible; it must be {rule}")
        sections[name] = cls(**kwargs)
    cfg = RunConfig(**sections)
    if cfg.data.source in ("folder", "json", "hf") and not cfg.data.path:
        raise ConfigError(f"data.path is required when data.source is {cfg.data.source!r}")
    return cfg


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`a.b=value` with value parsed as YAML (`--set generation.top_k=5`, `--set data.tasks=[a,b]`)."""
    raw = json.loads(json.dumps(raw or {}))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"--set {key!r}: expected section.key")
        try:
            parsed = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse {value!r}: {str(e).splitlines()[0]}") from e
        if not isinstance(raw.get(parts[0]), dict):
            raw[parts[0]] = {}
        raw[parts[0]][parts[1]] = parsed
    return raw


def load(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    return from_dict(apply_overrides(raw, list(overrides)))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def data_keys(cfg: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in flatten(cfg.to_dict()).items() if k not in NON_DATA_KEYS}


def data_fingerprint(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(data_keys(cfg), sort_keys=True).encode()).hexdigest()[:16]


def differing_keys(old: dict, new: RunConfig) -> list[str]:
    """Data-changing keys whose values differ between a stored config dict and `new`."""
    before = {k: v for k, v in flatten(old).items() if k not in NON_DATA_KEYS}
    after = data_keys(new)
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
