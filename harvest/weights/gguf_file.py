"""Read a Qwen2 .gguf file (llama.cpp's format) into harvest's params leaves, without torch.

    hf_config, leaves = load_gguf(Path("qwen2.5-0.5b-q4_k_m.gguf"), jnp.bfloat16)
    tokenizer = load_gguf_tokenizer("qwen2.5-0.5b-q4_k_m.gguf")

The file is memory-mapped with the `gguf` package (an optional dependency). Each tensor is
de-quantized on its own, a block of rows at a time, straight into a buffer of the target dtype,
so no float32 copy of the whole model (or even of the embedding matrix) ever exists. Which tensors
to read, and their shapes, come from the ParamSpec table in harvest.engine.params (gguf_name).

Layout notes, checked against llama.cpp's convert_hf_to_gguf.py and transformers' GGUF loader:
  * GGUF lists dims fastest-first (ne[0] is the contiguous axis), so a tensor stored with
    ne = [in, out] is a row-major numpy array of shape [out, in]: the Hugging Face layout,
    no transpose needed.
  * llama.cpp permutes q/k rows (interleaved rotary pairs) only for archs that use its NORM
    rope (llama, mistral, ...). qwen2 uses NEOX rope, which is Hugging Face's rotate_half, and
    its converter writes q/k unchanged, so nothing is un-permuted here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from harvest.engine import params as P
from harvest.engine.config import ModelConfig, ModelError

log = logging.getLogger(__name__)

SUPPORTED_GGUF_ARCHITECTURES = ("qwen2",)

# De-quantize at most this many elements at once (64 MiB of float32 scratch).
_CHUNK_ELEMENTS = 1 << 24


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ModelError("reading .gguf files needs the gguf package: pip install gguf") from e
    return gguf


class GGUFFile:
    """A memory-mapped GGUF file: its metadata and its tensors, de-quantized one at a time."""

    def __init__(self, path: Path):
        gguf = _gguf()
        path = Path(path).expanduser()
        if not path.is_file():
            raise ModelError(f"GGUF file {str(path)!r} does not exist")
        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path), "r")
        except Exception as e:
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            raise ModelError(f"{path} is not a readable GGUF file: {type(e).__name__}: {msg}") from e
        if self.reader.byte_order != "I":
            raise ModelError(f"{path} is a big-endian GGUF file; harvest reads little-endian GGUF only")
        self.tensors = {t.name: t for t in self.reader.tensors}

    # ---- metadata -------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        return default if value is None else value

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelError(f"{self.path.name} lacks the GGUF metadata key {key!r}")
        return value

    @property
    def architecture(self) -> str:
        return str(self.get("general.architecture", "unknown"))

    def check_architecture(self) -> None:
        arch = self.architecture
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise ModelError(
                f"unsupported GGUF architecture {arch!r} in {self.path.name}: harvest supports "
                f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)} GGUF files only (Qwen2ForCausalLM)"
            )

    def hf_config(self) -> dict[str, Any]:
        """A Hugging Face style config.json dict for a qwen2 GGUF (the keys ModelConfig reads)."""
        self.check_architecture()
        a = self.architecture
        embd = P.GLOBAL_SPECS["embed"].gguf_name
        if embd not in self.tensors:
            raise ModelError(f"{self.path.name} has no {embd} tensor")
        embd_shape = self.shape(embd)
        if len(embd_shape) != 2:
            raise ModelError(f"{embd} in {self.path.name} has shape {embd_shape}, expected 2-D")
        n_heads = int(self.require(f"{a}.attention.head_count"))
        d_model = int(self.require(f"{a}.embedding_length"))
        hf: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": int(embd_shape[0]),
            "hidden_size": d_model,
            "num_hidden_layers": int(self.require(f"{a}.block_count")),
            "intermediate_size": int(self.require(f"{a}.feed_forward_length")),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(self.get(f"{a}.attention.head_count_kv", n_heads)),
            "rms_norm_eps": float(self.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            "max_position_embeddings": int(self.get(f"{a}.context_length", 32768)),
            "tie_word_embeddings": P.GLOBAL_SPECS["lm_head"].gguf_name not in self.tensors,
            "use_sliding_window": False,
            "hidden_act": "silu",
        }
        theta = self.get(f"{a}.rope.freq_base")
        if theta is not None:
            hf["rope_theta"] = float(theta)
        else:
            log.warning("%s has no %s.rope.freq_base; assuming the Qwen2 value 1e6", self.path.name, a)
        key_len = self.get(f"{a}.attention.key_length")
        if key_len is not None and int(key_len) != d_model // n_heads:
            hf["head_dim"] = int(key_len)
        scaling = self.get(f"{a}.rope.scaling.type")
        if scaling is not None and str(scaling) != "none":
            # ModelConfig refuses anything but default RoPE, with a one-line message.
            hf["rope_scaling"] = {"rope_type": str(scaling), "factor": float(self.get(f"{a}.rope.scaling.factor", 1.0))}
        for ours, key in (
            ("bos_token_id", "bos_token_id"),
            ("eos_token_id", "eos_token_id"),
            ("pad_token_id", "padding_token_id"),
        ):
            value = self.get(f"tokenizer.ggml.{key}")
            if value is not None:
                hf[ours] = int(value)
        name = self.get("general.name")
        if name is not None:
            hf["_name_or_path"] = str(name)
        return hf

    # ---- tensors --------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        """The numpy / Hugging Face shape (GGUF's ne reversed: slowest axis first)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def load_numpy(self, name: str, dtype, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """De-quantize one tensor into a fresh numpy array of `dtype`, a block of rows at a time."""
        gguf = _gguf()
        if name not in self.tensors:
            raise ModelError(f"{self.path.name} has no tensor {name!r}")
        t = self.tensors[name]
        full = self.shape(name)
        if shape is not None and tuple(shape) != full:
            raise ModelError(f"tensor {name!r} in {self.path.name} has shape {full}, config implies {tuple(shape)}")
        out = np.empty(full, dtype=np.dtype(dtype))
        data = t.data  # memmap view: [*rows, row elements] (plain types) or [*rows, row bytes] (quantized)
        rows_out = out.reshape(-1, full[-1]) if len(full) > 1 else out.reshape(1, -1)
        rows_in = data.reshape(rows_out.shape[0], -1)
        step = max(1, _CHUNK_ELEMENTS // max(1, full[-1]))
        try:
            for r in range(0, rows_out.shape[0], step):
                block = gguf.dequantize(np.ascontiguousarray(rows_in[r : r + step]), t.tensor_type)
                rows_out[r : r + step] = block.reshape(-1, full[-1])
        except NotImplementedError as e:
            raise ModelError(
                f"tensor {name!r} uses GGML type {t.tensor_type.name}, which this gguf package cannot de-quantize: {e}"
            ) from e
        return out

    def load(self, name: str, dtype, shape: tuple[int, ...] | None = None) -> jax.Array:
        return jax.device_put(self.load_numpy(name, jnp.dtype(dtype), shape))  # jnp.asarray: a compile per shape


def load_gguf(path: Path, dtype) -> tuple[dict[str, Any], dict[tuple, jax.Array]]:
    """-> (Hugging Face style config dict, {params pytree path: array of `dtype`})."""
    f = GGUFFile(path)
    hf = f.hf_config()
    cfg = ModelConfig.from_hf(hf)
    # Tensor names come from the one ParamSpec table, like the safetensors loader's.
    return hf, {leaf.path: f.load(leaf.gguf_name, dtype, leaf.shape) for leaf in P.iter_specs(cfg)}


def load_gguf_tokenizer(path):
    """The tokenizer for a .gguf file.

    First transformers' own GGUF tokenizer conversion (it reads tokenizer.ggml.* from the file,
    but transformers refuses to run it without torch); failing that, a tokenizer.json in the
    same folder as the .gguf file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"GGUF file {str(path)!r} does not exist")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # ImportError without torch; ValueError/KeyError for odd vocabularies
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        reason = f"{type(e).__name__}: {msg}"
    if (path.parent / "tokenizer.json").is_file():
        log.warning(
            "cannot build a tokenizer from %s (%s); using %s", path.name, reason, path.parent / "tokenizer.json"
        )
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent))
        except Exception:
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast(tokenizer_file=str(path.parent / "tokenizer.json"))
        _fill_from_gguf(tok, path)
        return tok
    raise ModelError(
        f"cannot build a tokenizer from {path.name} ({reason}) and there is no tokenizer.json "
        f"beside it; install torch, or put the model's tokenizer.json in {path.parent}"
    )


def _fill_from_gguf(tok, path: Path) -> None:
    """A bare tokenizer.json carries no chat template or EOS token; take them from the GGUF."""
    if getattr(tok, "chat_template", None) and tok.eos_token is not None:
        return
    try:
        f = GGUFFile(path)
    except ModelError as e:
        log.warning("cannot read %s for its chat template: %s", path.name, e)
        return
    template = f.get("tokenizer.chat_template")
    if template and not getattr(tok, "chat_template", None):
        tok.chat_template = str(template)
    eos = f.get("tokenizer.ggml.eos_token_id")
    if tok.eos_token is None and eos is not None:
        token = tok.convert_ids_to_tokens(int(eos))
        if token is not None and int(eos) < len(tok):
            tok.eos_token = token
