"""GGUF loading: tiny Qwen2 models written with the gguf package's own writer load into params that
equal the torch weights, and prefill logits equal transformers' at float32 1e-4."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from harvest.engine.config import ModelConfig, ModelError  # noqa: E402
from harvest.engine.model import logits as lm_logits  # noqa: E402
from harvest.engine.params import GLOBAL_SPECS, LAYER_SPECS, iter_specs  # noqa: E402
from harvest.engine.prefill import forward  # noqa: E402
from harvest.weights import gguf_file as gguf_loader  # noqa: E402
from harvest.weights.checkpoint import load_model  # noqa: E402
from helpers import models  # noqa: E402

ATOL = 1e-4
Q = gguf.GGMLQuantizationType
# Smaller than conftest's TINY, with token ids the GGUF metadata can carry.
SHAPE = dict(vocab_size=256, num_hidden_layers=2, intermediate_size=128, bos_token_id=1, eos_token_id=2)
REAL_GGUF = Path("~/.cache/harvest-fixtures/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf").expanduser()
REAL_FOLDER = REAL_GGUF.parent / "qwen2.5-coder-0.5b-instruct"


def make_hf_model(seed: int, tie: bool):
    return models.make_hf_model(seed, tie, **SHAPE)


def hf_to_gguf_name(hf_name: str) -> str:
    """HF tensor name -> llama.cpp name, written independently of ParamSpec.gguf_name to cross-check it."""
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    parts = hf_name.split(".")  # model.layers.{i}.<module>.<sub>.<weight|bias>
    i, rest = parts[2], ".".join(parts[3:])
    table = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{table[module]}.{kind}"


def write_gguf(
    model, path: Path, *, quant: str = "f32", arch: str = "qwen2", chat_template: str | None = None
) -> dict[str, np.ndarray]:
    """Write `model` as a GGUF file the way llama.cpp's converter does (no q/k permutation for qwen2).

    quant "f32": every tensor F32. "mixed": 2-D weights alternate Q8_0 / F16, the embedding is F16,
    norms and biases stay F32 (as llama.cpp keeps them). Returns {hf name: the float32 values the
    file really holds} (what a correct loader must produce).
    """
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta if hasattr(c, "rope_theta") else c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    held = {}
    for n, (name, p) in enumerate(model.state_dict().items()):
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        x = p.detach().numpy().astype(np.float32)
        if quant == "mixed" and x.ndim == 2 and (n % 2 == 0) and "embed" not in name:
            raw = gguf.quants.quantize(x, Q.Q8_0)
            w.add_tensor(hf_to_gguf_name(name), raw, raw_dtype=Q.Q8_0)
            held[name] = gguf.quants.dequantize(raw, Q.Q8_0).reshape(x.shape)
        elif quant == "mixed" and x.ndim == 2:
            w.add_tensor(hf_to_gguf_name(name), x.astype(np.float16))
            held[name] = x.astype(np.float16).astype(np.float32)
        else:
            w.add_tensor(hf_to_gguf_name(name), x)
            held[name] = x
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def leaves_by_hf_name(lm) -> dict[str, np.ndarray]:
    out = {}
    for key, spec in GLOBAL_SPECS.items():
        if key in lm.params:
            out[spec.hf_name] = np.asarray(lm.params[key])
    for i, layer in enumerate(lm.params["layers"]):
        for key, spec in LAYER_SPECS.items():
            out[spec.hf_name.format(i=i)] = np.asarray(layer[key])
    return out


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    model = make_hf_model(0, tie=False)
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    held = write_gguf(model, path)
    return model, path, held


def logits_at_cuts(lm, ids: np.ndarray, cuts: list[int]) -> np.ndarray:
    """harvest's logits for the prefixes ids[:c], one row per cut (a causal pass: position c - 1 of the whole)."""
    x, _ = forward(lm.cfg, lm.params, jnp.asarray(ids[None]))
    return np.asarray(lm_logits(lm.cfg, lm.params, x[0, np.asarray(cuts) - 1]))


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids[None], dtype=torch.long)).logits[0].numpy()


def test_f32_gguf_params_equal_torch_weights_exactly(untied):
    model, path, _ = untied
    lm = load_model(str(path), "float32")
    assert lm.cfg.vocab_size == 256 and lm.cfg.n_layers == 2 and lm.cfg.n_kv_heads == 2 and lm.cfg.d_mlp == 128
    assert lm.cfg.rope_theta == 1_000_000.0 and not lm.cfg.tie_embeddings
    assert lm.hf_config["bos_token_id"] == 1 and 2 in lm.eos_ids
    ours = leaves_by_hf_name(lm)
    sd = model.state_dict()
    assert set(ours) == set(sd)
    for name, value in sd.items():
        assert ours[name].dtype == np.float32
        # Exact: also proves q/k rows come back in Hugging Face order (qwen2 GGUFs are not permuted).
        np.testing.assert_array_equal(ours[name], value.numpy(), err_msg=name)


def test_f32_gguf_logits_match_transformers(untied):
    model, path, _ = untied
    lm = load_model(str(path), "float32")
    ids = np.random.default_rng(1).integers(0, 256, 560).astype(np.int32)
    cuts = [1, 77, 300, 513, 560]
    ours = logits_at_cuts(lm, ids, cuts)
    ref = hf_logits(model, ids)[[c - 1 for c in cuts]]
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    assert np.abs(ref).max() > 1.0  # peaked logits: 1e-4 is a real test


def test_quantized_gguf_matches_its_dequantized_values(tmp_path):
    """F16 and Q8_0 tensors de-quantize to exactly what the file holds, in [out, in] order, and the
    model they describe gives transformers' logits."""
    model = make_hf_model(2, tie=False)
    path = tmp_path / "tiny-mixed.gguf"
    held = write_gguf(model, path, quant="mixed")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert Q.Q8_0 in types.values() and Q.F16 in types.values() and types["blk.0.attn_q.bias"] == Q.F32
    lm = load_model(str(path), "float32")
    ours = leaves_by_hf_name(lm)
    for name, value in held.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
        np.testing.assert_allclose(ours[name], model.state_dict()[name].numpy(), atol=0.05, rtol=0.01, err_msg=name)
    # The de-quantized model in torch gives the same logits as harvest.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(held[name]))
    ids = np.random.default_rng(3).integers(0, 256, 520).astype(np.int32)
    np.testing.assert_allclose(logits_at_cuts(lm, ids, [520]), hf_logits(model, ids)[[519]], atol=ATOL, rtol=0)


def test_tied_gguf_and_bfloat16(tmp_path):
    model = make_hf_model(4, tie=True)
    path = tmp_path / "tiny-tied.gguf"
    write_gguf(model, path)
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(path)).tensors}
    lm = load_model(str(path), "bfloat16")
    assert lm.cfg.tie_embeddings and lm.hf_config["tie_word_embeddings"] and "lm_head" not in lm.params
    assert lm.params["embed"].dtype == jnp.bfloat16 and lm.params["layers"][1]["down_w"].dtype == jnp.bfloat16
    want = model.state_dict()["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(lm.params["layers"][1]["down_w"], np.float32), want)


def test_load_gguf_returns_leaves_keyed_by_param_paths(untied):
    _, path, _ = untied
    hf, leaves = gguf_loader.load_gguf(path, jnp.float16)
    assert hf["model_type"] == "qwen2" and hf["architectures"] == ["Qwen2ForCausalLM"]
    assert hf["num_hidden_layers"] == 2 and hf["hidden_size"] == 64 and hf["intermediate_size"] == 128
    assert hf["num_attention_heads"] == 4 and hf["num_key_value_heads"] == 2 and hf["vocab_size"] == 256
    assert hf["max_position_embeddings"] == 4096 and abs(hf["rms_norm_eps"] - 1e-6) < 1e-12
    assert ("embed",) in leaves and ("lm_head",) in leaves and ("layers", 1, "q_b") in leaves
    assert leaves[("layers", 0, "k_w")].shape == (32, 64) and leaves[("layers", 0, "k_w")].dtype == jnp.float16
    assert len(leaves) == 3 + 2 * len(LAYER_SPECS)


def test_gguf_names_come_from_param_specs(untied, monkeypatch):
    """The loader has no table of its own: it reads exactly the ParamSpec gguf names, in iter_specs order."""
    for spec in (*GLOBAL_SPECS.values(), *LAYER_SPECS.values()):
        # The spec agrees with this file's independently written HF -> llama.cpp mapping.
        assert spec.gguf_name.format(i=7) == hf_to_gguf_name(spec.hf_name.format(i=7))
    _, path, _ = untied
    read, load_numpy = [], gguf_loader.GGUFFile.load_numpy

    def recording(self, name, *args, **kwargs):
        read.append(name)
        return load_numpy(self, name, *args, **kwargs)

    monkeypatch.setattr(gguf_loader.GGUFFile, "load_numpy", recording)
    hf, _ = gguf_loader.load_gguf(path, jnp.float32)
    assert read == [leaf.gguf_name for leaf in iter_specs(ModelConfig.from_hf(hf))]
    # Renaming a tensor in the spec alone changes what the loader asks the file for.
    renamed = dataclasses.replace(LAYER_SPECS["q_b"], gguf_name="blk.{i}.attn_q.renamed")
    monkeypatch.setitem(LAYER_SPECS, "q_b", renamed)
    with pytest.raises(ModelError) as e:
        gguf_loader.load_gguf(path, jnp.float32)
    assert "has no tensor 'blk.0.attn_q.renamed'" in one_line(e)


def test_chunked_dequantization(untied, monkeypatch):
    """Large tensors are converted a block of rows at a time; the result must not depend on it."""
    model, path, _ = untied
    monkeypatch.setattr(gguf_loader, "_CHUNK_ELEMENTS", 100)  # one 64-wide row per block
    f = gguf_loader.GGUFFile(path)
    np.testing.assert_array_equal(
        f.load_numpy("token_embd.weight", np.float32), model.state_dict()["model.embed_tokens.weight"].numpy()
    )
    monkeypatch.setattr(gguf_loader, "_CHUNK_ELEMENTS", 64 * 7)  # 7 rows a block, ragged last block
    np.testing.assert_array_equal(
        f.load_numpy("blk.1.ffn_down.weight", np.float32),
        model.state_dict()["model.layers.1.mlp.down_proj.weight"].numpy(),
    )


# ---- refusals --------------------------------------------------------------------------------


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_non_qwen2_architecture_is_refused(tmp_path):
    model = make_hf_model(5, tie=True)
    path = tmp_path / "tiny-llama.gguf"
    write_gguf(model, path, arch="llama")
    with pytest.raises(ModelError) as e:
        load_model(str(path), "float32")
    msg = one_line(e)
    assert "'llama'" in msg and "qwen2" in msg


def test_missing_file_gives_clear_error(tmp_path):
    with pytest.raises(ModelError) as e:
        load_model(str(tmp_path / "nope.gguf"))
    assert "does not exist" in one_line(e)
    with pytest.raises(ModelError) as e:
        gguf_loader.load_gguf(tmp_path / "nope.gguf", jnp.float32)
    assert "does not exist" in one_line(e)


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelError) as e:
        load_model(str(path))
    assert "GGUF" in one_line(e)


def test_missing_metadata_is_refused(tmp_path):
    path = tmp_path / "no-heads.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_tensor("token_embd.weight", np.zeros((10, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError) as e:
        load_model(str(path))
    assert "qwen2.attention.head_count" in one_line(e)


def test_wrong_tensor_shape_is_refused(tmp_path):
    bad = make_hf_model(0, tie=False)
    bad.config.intermediate_size = 96  # metadata disagrees with the ffn tensors
    path = tmp_path / "bad-shape.gguf"
    write_gguf(bad, path)
    with pytest.raises(ModelError) as e:
        load_model(str(path), "float32")
    assert "shape" in one_line(e)


def test_gguf_package_missing_gives_install_hint(untied, monkeypatch):
    _, path, _ = untied
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(ModelError, match="pip install gguf"):
        gguf_loader.load_gguf(path, jnp.float32)


# ---- tokenizer -------------------------------------------------------------------------------


def write_tokenizer_json(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "<|end|>": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))


def test_tokenizer_falls_back_to_tokenizer_json(tmp_path):
    model = make_hf_model(6, tie=True)
    path = tmp_path / "tiny.gguf"
    template = "{% for m in messages %}{{ m['content'] }} <|end|>{% endfor %}"
    write_gguf(model, path, chat_template=template)
    # The tiny file has no tokenizer.ggml.* vocabulary, so transformers' GGUF route fails.
    with pytest.raises(ModelError) as e:
        gguf_loader.load_gguf_tokenizer(path)
    assert "tokenizer.json" in one_line(e)
    write_tokenizer_json(tmp_path)
    tok = gguf_loader.load_gguf_tokenizer(path)
    assert tok("hello <|end|> hello")["input_ids"] == [1, 2, 1]
    # A bare tokenizer.json has no chat template or EOS: both come from the GGUF metadata.
    assert tok.eos_token == "<|end|>" and tok.eos_token_id == 2
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False) == "hello <|end|>"
    with pytest.raises(ModelError, match="does not exist"):
        gguf_loader.load_gguf_tokenizer(tmp_path / "nope.gguf")


NO_TORCH = """
import sys
sys.modules["torch"] = None  # as if torch were not installed
import numpy as np
from harvest.weights.checkpoint import load_model
from harvest.weights.gguf_file import load_gguf_tokenizer
lm = load_model(sys.argv[1], "float32")
np.save(sys.argv[2], np.asarray(lm.params["layers"][1]["q_w"]))
print(load_gguf_tokenizer(sys.argv[1])("hello hello")["input_ids"])
assert sys.modules["torch"] is None
"""


def test_runs_without_torch(untied, tmp_path):
    import subprocess

    model, path, _ = untied
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / path.name).write_bytes(path.read_bytes())
    write_tokenizer_json(folder)
    out = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(folder / path.name), str(tmp_path / "q.npy")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[1, 1]"
    np.testing.assert_array_equal(
        np.load(tmp_path / "q.npy"), model.state_dict()["model.layers.1.self_attn.q_proj.weight"].numpy()
    )


# ---- the real Q4_K_M file (local only; ~25 s) ------------------------------------------------


@pytest.mark.skipif(
    not (REAL_GGUF.is_file() and (REAL_FOLDER / "model.safetensors").is_file()),
    reason="the real Qwen2.5-Coder-0.5B Q4_K_M GGUF fixture is not present",
)
def test_real_q4_k_m_gguf_matches_transformers_dequantization():
    """The fixture folder holds transformers' own de-quantization of the same GGUF, saved as bf16."""
    from harvest.weights.checkpoint import TensorIndex, read_json

    f = gguf_loader.GGUFFile(REAL_GGUF)
    assert ModelConfig.from_hf(f.hf_config()) == ModelConfig.from_hf(read_json(REAL_FOLDER / "config.json"))
    checks = {
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",  # Q5_0
        "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
        "blk.0.attn_q.bias": "model.layers.0.self_attn.q_proj.bias",
        "blk.23.ffn_down.weight": "model.layers.23.mlp.down_proj.weight",  # Q6_K
        "blk.5.attn_v.weight": "model.layers.5.self_attn.v_proj.weight",
    }
    assert Q.Q4_K in {t.tensor_type for t in f.tensors.values()}
    q4k = next(n for n, t in f.tensors.items() if t.tensor_type == Q.Q4_K and n.startswith("blk."))
    checks[q4k] = (
        "model.layers.{}."
        + {
            "ffn_down": "mlp.down_proj",
            "attn_v": "self_attn.v_proj",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
        }[q4k.split(".")[2]]
        + ".weight"
    ).format(q4k.split(".")[1])
    types = {name: f.tensors[name].tensor_type.name for name in checks}
    with TensorIndex([REAL_FOLDER / "model.safetensors"]) as st:
        for g, h in checks.items():
            ours = f.load_numpy(g, np.float32)
            ref = np.asarray(st.load(h, ours.shape, jnp.float32))
            # The reference is stored as bf16: relative rounding <= 2^-8.
            np.testing.assert_allclose(ours, ref, rtol=2**-8, atol=1e-6, err_msg=f"{g} ({types.get(g)})")
