"""The run config: YAML -> frozen dataclasses, validated key by key with one-line errors.

Every key is documented in configs/demo.yaml. `--set a.b=value` overrides parse values as YAML.
`data_fingerprint` covers every key that changes what lands on disk; resume refuses a change there
and names it with its old and new values. The runtime section only schedules work, so its keys may
change between sessions of one run (NON_DATA_KEYS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from harvest import arc
from harvest.arc.prompts import FORMATS
from harvest.arc.tasks import SOURCES, SPLITS
from harvest.cli.distributed import check_distributed
from harvest.engine.generate import GenerateConfig
from harvest.engine.hooks import Hook
from harvest.engine.sampling import SamplingConfig
from harvest.engine.sharding import check_mesh_axes, make_mesh
from harvest.errors import FieldError, HarvestError
from harvest.store.format import CODECS, PHASES, STORAGE_DTYPES
from harvest.weights.checkpoint import DTYPES


class ConfigError(HarvestError, ValueError):
    """A bad config. The message is one line and names the key."""


@contextlib.contextmanager
def library_checks(section: str):
    """A library config's FieldError becomes a ConfigError naming the YAML key: sections use the
    library's field names, and a field they don't have is looked up in the other sections."""
    try:
        yield
    except FieldError as e:
        owner = (
            section
            if e.field in {f.name for f in dataclasses.fields(_SECTION_TYPES[section])}
            else next(
                (name for name, cls in _SECTION_TYPES.items() if e.field in {f.name for f in dataclasses.fields(cls)}),
                section,
            )
        )
        raise ConfigError(f"{owner}.{e.field}: {e.message}") from None


def expand_paths(section, *names: str) -> None:
    """`~` and environment variables in path keys, expanded once, so every later use and run.json agree."""
    for name in names:
        value = getattr(section, name)
        if isinstance(value, str):
            object.__setattr__(section, name, os.path.expandvars(os.path.expanduser(value)))


@dataclasses.dataclass(frozen=True)
class ModelSection:
    path: str = "random:tiny"  # hub id | folder | .gguf | random:<preset>
    dtype: Literal[tuple(DTYPES)] = "bfloat16"  # compute dtype

    def __post_init__(self):
        expand_paths(self, "path")


@dataclasses.dataclass(frozen=True)
class DataSection:
    source: Literal[SOURCES] = "arc-agi-1"
    split: Literal[tuple(SPLITS)] = "evaluation"
    path: str | None = None  # folder / json file / hf dataset (path or hub id)
    solutions: str | None = None  # Kaggle-style solutions file for source=json
    tasks: list[str] | None = None  # task ids; null means all
    limit: int | None = None  # after the seeded shuffle
    shuffle_seed: int | None = None  # null keeps the dataset order
    max_prompt_tokens: int = 8192  # longer prompts are skipped and counted

    def __post_init__(self):
        expand_paths(self, "path", "solutions")
        if self.source in ("folder", "json", "hf") and not self.path:
            raise ConfigError(f"data.path is required when data.source is {self.source!r}")

    def load_tasks(self) -> tuple[list[arc.Task], list[arc.Skipped]]:
        return arc.load_tasks(
            self.source, self.split, self.path, self.tasks, self.limit, self.shuffle_seed, self.solutions
        )


@dataclasses.dataclass(frozen=True)
class PromptSection:
    format: Literal[FORMATS] = "digits"
    chat: Literal["auto"] | bool = "auto"  # auto: the chat template for instruct checkpoints
    system: str | None = None
    user: str | None = None  # null: the built-in instructions

    def __post_init__(self):
        with library_checks("prompt"):
            self.to_prompt_config()

    def to_prompt_config(self) -> arc.PromptConfig:
        user = {} if self.user is None else {"user": self.user}
        return arc.PromptConfig(format=self.format, chat=self.chat, system=self.system, **user)


@dataclasses.dataclass(frozen=True)
class AugmentSection:
    dihedral: bool = False  # also run the 7 non-identity dihedral transforms
    colors: int = 0  # colour permutations per test input
    keep_zero: bool = True  # keep colour 0 (background) fixed
    shuffle_demos: bool = False

    def __post_init__(self):
        with library_checks("augment"):
            self.to_augment_config()

    def to_augment_config(self) -> arc.AugmentConfig:
        return arc.AugmentConfig(
            dihedral=self.dihedral, colors=self.colors, keep_zero=self.keep_zero, shuffle_demos=self.shuffle_demos
        )


@dataclasses.dataclass(frozen=True)
class GenerationSection:
    max_new_tokens: int = 1024
    fixed_length: bool = False  # every row generates exactly max_new_tokens, ignoring EOS and stop strings
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    samples: int = 1  # sequences per (task, test input, augmentation)
    seed: int = 0
    stop_strings: Literal["auto"] | list[str] = "auto"  # auto: the prompt format's rule

    def __post_init__(self):
        with library_checks("generation"):
            self.to_sampling_config()

    def to_sampling_config(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)


@dataclasses.dataclass(frozen=True)
class CaptureSection:
    hooks: list[str] = dataclasses.field(default_factory=lambda: ["blocks.0.hook_resid_post"])
    phases: list[Literal[tuple(PHASES)]] = dataclasses.field(default_factory=lambda: list(PHASES))
    dtype: Literal[STORAGE_DTYPES] = "bfloat16"  # storage dtype
    codec: Literal[CODECS] = "blosc-zstd"
    shard_mb: float = 128.0  # activation MiB per shard: the write and commit unit
    # prompts sharing at least this many leading tokens with an earlier sequence's prompt (samples of one
    # prompt, test inputs of one task) are prefilled once and those rows are stored once; 0: never
    min_shared_prefix: int = 128


@dataclasses.dataclass(frozen=True)
class RuntimeSection:
    batch_size: int = 8  # prompts per prefill call
    decode_slots: int = 32  # sequences decoding at once (continuous batching); at most the run's sequences
    prefill_chunk: int = 128  # prompt tokens per prompt per prefill call
    tail_slots: int | None = None  # pool size for the last few live rows; null: decode_slots // 4; 0: off
    narrow_lanes: int | None = None  # prefill call width when few prompts prefill; null: batch_size // 4; 0: off
    queue: int = 8  # finished sequences waiting for the writer (bounds host RAM)
    writer_threads: int | None = None  # threads compressing a shard's chunks; null: the usable cores, at most 8
    max_capture_gb: float = 8.0  # refuse settings whose capture buffers would exceed this
    compile_cache: str | None = "~/.cache/harvest/jax"  # persistent XLA cache; null disables
    progress: bool = True
    # {data: n, model: m} over this process's devices (-1: the devices left); null: one device
    mesh: dict | None = None
    # several processes writing one run (harvest.cli.distributed): {coordinator_address, num_processes,
    # process_id, ...}, passed to jax.distributed.initialize; {}: detected as JAX does; null: one process
    distributed: dict | None = None

    def __post_init__(self):
        expand_paths(self, "compile_cache")
        with library_checks("runtime"):
            if self.mesh is not None:
                check_mesh_axes(self.mesh)
            if self.distributed is not None:
                check_distributed(self.distributed)


@dataclasses.dataclass(frozen=True)
class OutputSection:
    path: str = "outputs/run"

    def __post_init__(self):
        expand_paths(self, "path")


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

    def __post_init__(self):
        stops = () if self.generation.stop_strings == "auto" else tuple(self.generation.stop_strings)
        self.generate_config((), stops, 1)  # checks the generation and runtime keys the engine owns
        if self.generation.max_new_tokens == 0 and "decode" in self.capture.phases:
            raise ConfigError(
                "capture.phases: 'decode' needs answers, but generation.max_new_tokens is 0 (a prefill-only run); "
                "capture phases [prefill], or generate tokens"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def device_mesh(self):
        """runtime.mesh over this process's devices (a jax Mesh), or None: one device."""
        if self.runtime.mesh is None:
            return None
        with library_checks("runtime"):
            return make_mesh(self.runtime.mesh)

    def generate_config(
        self,
        hooks: tuple[Hook, ...],
        stop_strings: tuple[str, ...],
        longest_prompt: int,
        sequences: int | None = None,
        data: int = 1,
    ) -> GenerateConfig:
        """The engine's config: generation keys, runtime batching, and the hooks of each captured phase.
        The cache holds the longest prompt of the run, and the pool at most its `sequences` (rounded up to
        a multiple of the mesh's `data`): a slot no sequence can fill would decode at full cost every step.
        Both count all of the run's sequences, so a resume sizes them alike. sequences None: no bound."""
        g, r, phases = self.generation, self.runtime, set(self.capture.phases)
        slots = r.decode_slots
        if sequences is not None:
            slots = min(slots, max(r.batch_size, -(-sequences // data) * data))
        tail = r.tail_slots if r.tail_slots is None or r.tail_slots < slots else 0  # a pool that small needs none
        with library_checks("generation"):
            return GenerateConfig(
                batch_size=r.batch_size,
                decode_slots=slots,
                prefill_chunk=r.prefill_chunk,
                tail_slots=tail,
                narrow_lanes=r.narrow_lanes,
                max_prompt_len=longest_prompt,
                max_new_tokens=g.max_new_tokens,
                sampling=g.to_sampling_config(),
                fixed_length=g.fixed_length,
                stop_strings=stop_strings,
                seed=g.seed,
                prefill_hooks=hooks if "prefill" in phases else (),
                decode_hooks=hooks if "decode" in phases else (),
                share_prefixes=self.capture.min_shared_prefix > 0,
                acts_dtype=self.capture.dtype,
            )


_SECTION_TYPES = typing.get_type_hints(RunConfig)

# Keys that never change the stored data; everything else is part of the fingerprint. Every runtime key
# is one: the runtime section says how work is scheduled, never what the data means, so it may change
# between sessions of one run.
NON_DATA_KEYS = frozenset(
    {"capture.codec", "capture.shard_mb", "output.path"}
    | {f"runtime.{f.name}" for f in dataclasses.fields(RuntimeSection)}
)
RENAMED_KEYS = {"generation.ignore_eos": "generation.fixed_length"}
REMOVED_KEYS = {
    "runtime.buckets": "prompts are prefilled in chunks of runtime.prefill_chunk tokens, whatever their length",
    "runtime.attention_chunk": "prefill attention works in blocks of runtime.prefill_chunk",
}

# Rules no library config owns: key -> (what a value must satisfy, how the error message says it)
_CHECKS = {
    "data.limit": (lambda v: v is None or v >= 1, ">= 1"),
    "data.max_prompt_tokens": (lambda v: v >= 1, ">= 1"),
    "data.shuffle_seed": (lambda v: v is None or 0 <= v < 2**32, "null or in [0, 2**32)"),
    "generation.samples": (lambda v: v >= 1, ">= 1"),
    "capture.hooks": (lambda v: len(v) >= 1, "non-empty"),
    "capture.phases": (lambda v: len(v) >= 1 and len(set(v)) == len(v), "non-empty, no repeats"),
    "capture.shard_mb": (lambda v: v > 0, "> 0"),
    "capture.min_shared_prefix": (lambda v: v >= 0, ">= 0"),
    "runtime.queue": (lambda v: v >= 1, ">= 1"),
    "runtime.writer_threads": (lambda v: v is None or v >= 1, "null or >= 1"),
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
        if value not in typing.get_args(tp) or isinstance(value, bool) != any(
            isinstance(a, bool) for a in typing.get_args(tp)
        ):
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
            raise ConfigError(f"{name}: expected a mapping of keys, got {type(value).__name__} {value!r}")
        fields = typing.get_type_hints(cls)
        kwargs = {}
        for key, v in value.items():
            full = f"{name}.{key}"
            if full in RENAMED_KEYS:
                raise ConfigError(f"{full} was renamed {RENAMED_KEYS[full]}; rename the key")
            if full in REMOVED_KEYS:
                raise ConfigError(f"{full} was removed ({REMOVED_KEYS[full]}); delete the key")
            if key not in fields:
                raise ConfigError(f"unknown key {full!r}; {name} has {', '.join(fields)}")
            kwargs[key] = _check_type(full, v, fields[key])
            ok, rule = _CHECKS.get(full, (None, None))
            if ok is not None and not ok(kwargs[key]):
                raise ConfigError(f"{full}: {v!r} is impossible; it must be {rule}")
        sections[name] = cls(**kwargs)
    return RunConfig(**sections)


def _yaml_problem(e: yaml.YAMLError) -> tuple[str, Any]:
    """(what is wrong, where: the problem mark or None) of a YAML error, in one line."""
    problem = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
    return problem, getattr(e, "problem_mark", None)


def _parse_override(key: str, value: str) -> Any:
    if value == "":
        return None
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem, mark = _yaml_problem(e)
        at = f" at column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"--set {key}: cannot parse {value!r} as YAML{at}: {problem}") from None


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
        parsed = _parse_override(key.strip(), value)
        if not isinstance(raw.get(parts[0]), dict):
            raw[parts[0]] = {}
        raw[parts[0]][parts[1]] = parsed
    return raw


def read_yaml(path: str | Path) -> Any:
    """The config file's YAML; ConfigError naming the file, line and column of a syntax error."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; give a YAML run config (see configs/demo.yaml)")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except yaml.YAMLError as e:
        problem, mark = _yaml_problem(e)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{at}: not valid YAML: {problem}") from None


def load(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    raw = read_yaml(path)
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (model, data, prompt, ...), got a {type(raw).__name__}"
        )
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


def is_data_key(key: str) -> bool:
    """A flattened key (`runtime.mesh.data` is under `runtime.mesh`) that changes the data."""
    parts = key.split(".")
    return not any(".".join(parts[:i]) in NON_DATA_KEYS for i in range(1, len(parts) + 1))


def data_keys(cfg: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in flatten(cfg.to_dict()).items() if is_data_key(k)}


def data_fingerprint(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(data_keys(cfg), sort_keys=True).encode()).hexdigest()[:16]


_ABSENT = object()  # a key one of two configs lacks (added or removed by a harvest version)


def _shown(value: Any) -> str:
    return "absent" if value is _ABSENT else repr(value)


def differing_keys(old: dict, new: RunConfig) -> list[str]:
    """Data-changing keys whose values differ between a stored config dict and `new`, each as
    `key: old -> new` (e.g. `generation.max_new_tokens: 300 -> 200`), sorted by key."""
    before = {k: v for k, v in flatten(old).items() if is_data_key(k)}
    after = data_keys(new)
    return [
        f"{k}: {_shown(before.get(k, _ABSENT))} -> {_shown(after.get(k, _ABSENT))}"
        for k in sorted(before.keys() | after.keys())
        if before.get(k, _ABSENT) != after.get(k, _ABSENT)
    ]
