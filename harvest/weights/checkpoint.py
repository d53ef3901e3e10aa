"""Load a Qwen2 checkpoint into the params pytree: hub id, local folder, .gguf file or random preset.

    load_model("Qwen/Qwen2.5-0.5B-Instruct")       # hub (uses the local HF cache when offline)
    load_model("/models/qwen2.5-0.5b", "float32")  # folder: config.json + *.safetensors
    load_model("/models/qwen2.5-0.5b-q4.gguf")     # de-quantized with the gguf package
    load_model("random:tiny")                      # random weights, real Qwen2 tokenizer

Tensors are read one at a time from memory-mapped safetensors and cast straight to the target
dtype, so no float32 copy of the whole model ever exists. Pickle (.bin) checkpoints and custom
code (trust_remote_code) are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
import re
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from harvest.engine import params as P
from harvest.engine.config import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    ModelError,
    preset_hf_config,
)
from harvest.engine.stopping import eos_ids_for

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ASSETS = Path(__file__).parent.parent / "assets"
PACKAGED_TOKENIZER = ASSETS / "qwen2_tokenizer"
# The float dtypes the loader accepts; anything else (ints, fp8) is refused by name rather than cast.
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    params: dict
    hf_config: dict
    eos_ids: tuple[int, ...]
    source: str  # what the user asked for
    folder: Path | None  # where config/tokenizer were read (None for presets)
    weight_files: tuple[Path, ...]  # what the sha256 covers
    dtype: str
    _tokenizer: Any = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.weight_files and self.weight_files[0].suffix == ".gguf":
                from harvest.weights.gguf_file import load_gguf_tokenizer

                tok, origin = load_gguf_tokenizer(self.weight_files[0]), self.weight_files[0]
            else:
                tok, origin = load_tokenizer(self.folder), self.folder
            check_tokenizer_fits(tok, self.cfg.vocab_size, origin)
            self._tokenizer = tok
        return self._tokenizer

    _sha256: Future | None = dataclasses.field(default=None, init=False, repr=False)

    def hash_weights_in_background(self) -> None:
        """Start weights_sha256 on a thread (~1 s per GB; hashlib lets go of the GIL), for a caller that
        will need it and has other loading to overlap it with. Only such a caller pays for the read."""
        if self._sha256 is None:
            self._sha256 = in_background(files_sha256, self.source, self.weight_files)

    @property
    def weights_sha256(self) -> str:
        """sha256 over the weight files in order; for presets, over the preset name and seed."""
        self.hash_weights_in_background()
        return self._sha256.result()


def files_sha256(source: str, files: tuple[Path, ...]) -> str:
    h = hashlib.sha256()
    if not files:
        h.update(source.encode())
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def in_background(fn, *args) -> Future:
    """fn(*args) on a daemon thread (one that never holds up the process's exit); its result or error
    comes out of the future."""
    future: Future = Future()

    def work():
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # handed to whoever asks for the result
            future.set_exception(e)

    threading.Thread(target=work, daemon=True, name=f"harvest-{fn.__name__}").start()
    return future


def resolve_dtype(name: str):
    if name not in DTYPES:
        raise ModelError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(path: str, dtype: str = "bfloat16") -> LoadedModel:
    jdtype = resolve_dtype(dtype)
    path = str(path)
    if path.startswith("random:"):
        return _load_random(path, dtype, jdtype)
    local = Path(path).expanduser()
    if local.suffix == ".gguf":
        if not local.is_file():
            raise ModelError(f"GGUF file {path!r} does not exist")
        from harvest.weights.gguf_file import load_gguf

        hf, leaves = load_gguf(local, jdtype)
        cfg = ModelConfig.from_hf(hf)
        params = P.assemble(cfg, leaves)
        return LoadedModel(cfg, params, hf, eos_ids_for(hf, None, cfg.vocab_size), path, local.parent, (local,), dtype)
    if local.exists():
        if not local.is_dir():
            raise ModelError(f"model path {path!r} is a file; give a folder with config.json, or a .gguf file")
        return _load_folder(local, path, dtype, jdtype)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith((".", "/")):
        return _load_folder(_download(path), path, dtype, jdtype)
    raise ModelError(f"model path {path!r} does not exist (give a folder, a .gguf file, a hub id or random:tiny)")


def _load_random(path: str, dtype: str, jdtype) -> LoadedModel:
    parts = path.split(":")
    name = parts[1] if len(parts) > 1 else ""
    seed = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
    hf = preset_hf_config(name)
    cfg = ModelConfig.from_hf(hf)
    return LoadedModel(
        cfg, P.init_params(cfg, seed, jdtype), hf, eos_ids_for(hf, None, cfg.vocab_size), path, None, (), dtype
    )


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - a runtime dependency
        raise ModelError(f"huggingface_hub is needed to fetch {repo_id!r}: {e}") from e
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        raise ModelError(
            f"cannot fetch {repo_id!r}: the hub is unreachable and it is not in the local "
            f"Hugging Face cache; download it elsewhere and pass the folder"
        ) from e
    except Exception as e:
        try:  # offline: fall back to whatever the cache holds
            return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        except Exception:
            raise ModelError(f"cannot fetch {repo_id!r}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e


def read_json(path: Path) -> dict:
    """A JSON object from the model folder; ModelError naming the file, line and column otherwise."""
    fix = "download the model again"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); {fix}") from None
    except UnicodeDecodeError as e:
        raise ModelError(f"{path}: not UTF-8 text (byte {e.start}); {fix}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, got a {type(data).__name__}; {fix}")
    return data


def model_config(hf: dict, cfg_file: Path) -> ModelConfig:
    """config.json -> ModelConfig; a ModelError naming the file if it is not a usable Qwen2 config."""
    model_type, archs = hf.get("model_type"), hf.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
        raise ModelError(
            f"{cfg_file}: model_type {model_type!r} ({', '.join(map(str, archs)) or 'no architectures'}) is not "
            f"Qwen2; harvest loads {', '.join(SUPPORTED_ARCHITECTURES)} checkpoints only"
        )
    try:
        return ModelConfig.from_hf(hf)
    except ModelError as e:
        raise ModelError(f"{cfg_file}: {e}") from None
    except KeyError as e:
        raise ModelError(
            f"{cfg_file} lacks {e.args[0]!r}, which every Qwen2 config.json has; download it again"
        ) from None
    except (TypeError, ValueError) as e:
        raise ModelError(f"{cfg_file}: a size or setting is not a number ({e}); download it again") from None


def _load_folder(folder: Path, source: str, dtype: str, jdtype) -> LoadedModel:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"no config.json in {folder}; give a Hugging Face model folder (config.json + *.safetensors)")
    hf = read_json(cfg_file)
    if hf.get("auto_map"):
        raise ModelError(
            f"{folder} needs custom code (auto_map); harvest never runs trust_remote_code "
            f"and supports Qwen2ForCausalLM only"
        )
    cfg = model_config(hf, cfg_file)
    files = safetensors_files(folder)
    leaves = {}
    with TensorIndex(files) as tensors:
        for _, group in itertools.groupby(P.iter_specs(cfg), key=_load_group):
            group = list(group)
            loaded = tensors.load_all([(leaf.hf_name, leaf.shape) for leaf in group], jdtype)
            leaves |= {leaf.path: value for leaf, value in zip(group, loaded)}
    params = P.assemble(cfg, leaves)
    gen_file = folder / "generation_config.json"
    gen = read_json(gen_file) if gen_file.is_file() else None
    return LoadedModel(cfg, params, hf, eos_ids_for(hf, gen, cfg.vocab_size), source, folder, tuple(files), dtype)


def _load_group(leaf: P.Leaf) -> tuple:
    """Tensors loaded together: the globals, then each layer's (P.iter_specs' order)."""
    return leaf.path[:2] if leaf.path[0] == "layers" else ()


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index)["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelError(f"{index.name} names shard(s) missing from {folder}: {', '.join(missing)}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise ModelError(
            f"{folder} has only pickle weights (.bin/.pt), which harvest refuses to load; "
            f"convert them to safetensors first"
        )
    raise ModelError(f"no *.safetensors weights in {folder}; download the checkpoint's .safetensors files into it")


class TensorIndex:
    """Name -> tensor across one or more safetensors files: memory-mapped, read one tensor at a time.

    Hand-written rather than safetensors.safe_open, which copies each tensor into a Python bytes object
    before JAX copies it again: it loaded the 0.5B model 1.3-2.3x slower, onto CPU and GPU alike
    (bench/weights_load.py). Here the bytes go straight from the page cache to JAX. Every header is
    checked when the index is built, so a damaged file fails early with a one-line error naming it.
    """

    def __init__(self, files: list[Path]):
        self._entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for f in files:
            for name, entry in _read_header(f).items():
                self._entries[name] = (f, *entry)
        self._maps: dict[Path, np.memmap] = {}
        self._where = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} safetensors files)"

    def __enter__(self) -> TensorIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._maps.clear()  # loaded arrays keep whatever they need; drop our references to the maps

    def host_view(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor in its stored dtype: a read-only view of the memory map, no copy."""
        if name not in self._entries:
            raise ModelError(
                f"{self._where}: checkpoint has no tensor {name!r}, which config.json implies; "
                f"the weights are incomplete or belong to another model"
            )
        f, stored, stored_shape, start, end = self._entries[name]
        if stored not in _SAFETENSORS_DTYPES:
            raise ModelError(
                f"{f}: tensor {name!r} has unsupported dtype {stored}; harvest loads float weights "
                f"({', '.join(_SAFETENSORS_DTYPES)}), not quantized ones"
            )
        if stored_shape != tuple(shape):
            raise ModelError(
                f"{f}: tensor {name!r} has shape {stored_shape}, config.json implies {tuple(shape)}; "
                f"config.json and the weights belong to different models"
            )
        if f not in self._maps:
            self._maps[f] = np.memmap(f, dtype=np.uint8, mode="r")
        return self._maps[f][start:end].view(_SAFETENSORS_DTYPES[stored]).reshape(shape)

    def load(self, name: str, shape: tuple[int, ...], dtype) -> jax.Array:
        """One tensor on the device in `dtype` (load_all for many)."""
        return self.load_all([(name, shape)], dtype)[0]

    def load_all(self, tensors: list[tuple[str, tuple[int, ...]]], dtype) -> list[jax.Array]:
        """[(name, shape)] -> the tensors on the device in `dtype`, in buffers of their own.

        Narrowing (f32 -> bf16) is done by numpy on the host, so the smaller array is copied. Everything
        else goes through one XLA program per list: widening (bf16 -> f32) is much faster there than in
        numpy, and a tensor already in `dtype` is copied there, because on a CPU `jax.device_put` of a
        read-only memory map aliases the file (a checkpoint rewritten during a run would change its
        weights; test_loaded_weights_are_copies_not_views_of_the_file). Cast one by one, every distinct
        shape was a program to compile (12 at 0.5B, 0.85 s).
        Pass one layer at a time: its mapped or narrowed copies are the only extra memory."""
        target = jnp.dtype(dtype)
        arrays, mapped = [], []  # mapped: indices of arrays that may still be views of a file
        for name, shape in tensors:
            host = self.host_view(name, shape)
            if target.itemsize < host.dtype.itemsize:
                host = host.astype(target)  # a new, writable array: device_put copies it
            else:
                mapped.append(len(arrays))
            arrays.append(jax.device_put(host))  # jnp.asarray would compile a program per shape
        if mapped:
            for i, a in zip(mapped, _own_copies(tuple(arrays[i] for i in mapped), target)):
                arrays[i] = a
        return arrays


@functools.partial(jax.jit, static_argnames="dtype")
def _own_copies(arrays: tuple, dtype) -> tuple:
    """Each array in `dtype`, in a new buffer: a program's outputs never alias its (undonated) inputs."""
    return tuple(a.astype(dtype) for a in arrays)


def _read_header(f: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """{name: (dtype, shape, start, end)} with absolute byte offsets; a damaged file -> one-line ModelError."""

    def bad(why: str) -> ModelError:
        return ModelError(f"{f} is not a readable safetensors file: {why}; download it again")

    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            if size < 8:
                raise bad(f"{size} bytes is too short for a safetensors header")
            n = int.from_bytes(fh.read(8), "little")
            if n > size - 8:
                raise bad(f"the header claims {n} bytes but the file has {size} (truncated?)")
            header = json.loads(fh.read(n).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise bad(f"its header is garbled (byte {e.object[e.start]:#04x} at offset {8 + e.start} is not UTF-8)") from e
    except json.JSONDecodeError as e:
        raise bad(f"its header is not valid JSON ({e.msg} at offset {8 + e.pos})") from e
    except OSError as e:
        raise bad(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from e
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    header.pop("__metadata__", None)
    data, out = size - 8 - n, {}
    for name, meta in header.items():
        try:
            dtype, shape, (start, end) = str(meta["dtype"]), tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
            start, end = int(start), int(end)
        except (TypeError, KeyError, ValueError) as e:
            raise bad(f"malformed header entry for tensor {name!r}") from e
        if not 0 <= start <= end <= data:
            raise bad(f"tensor {name!r} has data offsets [{start}, {end}] outside its {data} data bytes (truncated?)")
        itemsize = np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize if dtype in _SAFETENSORS_DTYPES else None
        if itemsize is not None and end - start != itemsize * math.prod(shape):
            raise bad(f"tensor {name!r} has {end - start} bytes, not what {dtype} {list(shape)} needs")
        out[name] = (dtype, shape, 8 + n + start, 8 + n + end)
    return out


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()


# Tokenizer classes loaded directly: AutoTokenizer resolves a folder naming one of these to Qwen2's fast
# class too, but reads the model config on the way, which imports torch when it is installed (3.6 s of
# every run here).
QWEN2_TOKENIZER_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")


def load_tokenizer(folder: Path | None):
    """The checkpoint's own tokenizer, else the packaged Qwen2 one (random presets, bare test folders)."""
    if folder is None or not has_tokenizer(folder):
        if folder is not None:
            log.warning("no tokenizer in %s; using the packaged Qwen2 tokenizer", folder)
        folder = PACKAGED_TOKENIZER
    config = folder / "tokenizer_config.json"
    named = read_json(config).get("tokenizer_class") if config.is_file() else None
    if named in QWEN2_TOKENIZER_CLASSES:
        # the fast class, as AutoTokenizer picks: in transformers 4 Qwen2Tokenizer is the slow Python one
        from transformers import Qwen2TokenizerFast

        return Qwen2TokenizerFast.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def check_tokenizer_fits(tok, vocab_size: int, origin: Path | None) -> None:
    """Every id the tokenizer can give must have an embedding row: an id past the table would not fail
    but silently read another row (JAX clamps out-of-range gathers), so every number would be wrong.
    `origin` is the model folder or .gguf file (None for presets)."""
    n = len(tok)
    if n <= vocab_size:
        return
    if origin is not None and origin.is_dir() and not has_tokenizer(origin):
        raise ModelError(
            f"{origin} has no tokenizer (tokenizer.json or vocab.json), and the packaged Qwen2 tokenizer's {n} "
            f"tokens do not fit its vocab_size {vocab_size}; copy the checkpoint's tokenizer files into it"
        )
    raise ModelError(
        f"{origin or 'the model'}: the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}; "
        f"use the tokenizer that came with these weights"
    )


def describe(lm: LoadedModel) -> dict[str, Any]:
    """Provenance fields for run metadata."""
    return {
        "source": lm.source,
        "folder": str(lm.folder) if lm.folder else None,
        "dtype": lm.dtype,
        "weights_sha256": lm.weights_sha256,
        "config": lm.hf_config,
        "num_params": P.num_params(lm.params),
        "eos_ids": list(lm.eos_ids),
    }
