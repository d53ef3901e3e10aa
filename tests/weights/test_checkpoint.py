"""Checkpoint loading: folders, sharded safetensors, tied/untied, dtypes, presets, and refusals."""

import hashlib
import json
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from harvest.engine.config import ModelError
from harvest.weights.checkpoint import PACKAGED_TOKENIZER, load_model, load_tokenizer
from helpers.models import make_hf_model
from helpers.runs import ROOT


def torch_weights(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def check_params(lm, ref):
    p = lm.params
    np.testing.assert_array_equal(np.asarray(p["embed"], np.float32), ref["model.embed_tokens.weight"])
    for i, layer in enumerate(p["layers"]):
        np.testing.assert_array_equal(
            np.asarray(layer["q_b"], np.float32), ref[f"model.layers.{i}.self_attn.q_proj.bias"]
        )
        np.testing.assert_array_equal(
            np.asarray(layer["down_w"], np.float32), ref[f"model.layers.{i}.mlp.down_proj.weight"]
        )


def test_sharded_safetensors_with_index(tmp_path):
    model = make_hf_model(3)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    lm = load_model(str(tmp_path), "float32")
    check_params(lm, torch_weights(model))
    assert "lm_head" in lm.params and not lm.cfg.tie_embeddings
    np.testing.assert_array_equal(np.asarray(lm.params["lm_head"]), torch_weights(model)["lm_head.weight"])
    files = sorted(tmp_path.glob("*.safetensors"))  # the hash (made on a thread) covers every file, in order
    assert lm.weights_sha256 == hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def test_tied_embeddings(hf_tiny_tied):
    model, folder = hf_tiny_tied
    lm = load_model(str(folder), "float32")
    assert lm.cfg.tie_embeddings and "lm_head" not in lm.params
    check_params(lm, torch_weights(model))


def test_bfloat16_loads_without_float32_detour(hf_tiny):
    model, folder = hf_tiny
    lm = load_model(str(folder), "bfloat16")
    assert lm.params["layers"][0]["q_w"].dtype == jnp.bfloat16
    ref = torch_weights(model)["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(
        np.asarray(lm.params["layers"][0]["q_w"]).astype(np.float32), ref.astype(jnp.bfloat16).astype(np.float32)
    )


def test_rope_theta_and_eps_from_either_config_layout(tmp_path):
    from harvest.engine.config import ModelConfig

    base = dict(
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        vocab_size=10,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=16,
    )
    assert (
        ModelConfig.from_hf({**base, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}).rope_theta == 5e5
    )
    assert ModelConfig.from_hf({**base, "rope_theta": 2e5}).rope_theta == 2e5
    assert ModelConfig.from_hf(base).rope_theta == 1e6  # the Qwen2 default, never 10000
    assert ModelConfig.from_hf(base).rms_norm_eps == 1e-6
    assert ModelConfig.from_hf({**base, "sliding_window": 4096, "use_sliding_window": False}).n_layers == 1


def test_random_preset_is_deterministic():
    a = load_model("random:tiny", "float32")
    b = load_model("random:tiny", "float32")
    c = load_model("random:tiny:1", "float32")
    np.testing.assert_array_equal(np.asarray(a.params["layers"][1]["k_w"]), np.asarray(b.params["layers"][1]["k_w"]))
    assert not np.array_equal(np.asarray(a.params["layers"][1]["k_w"]), np.asarray(c.params["layers"][1]["k_w"]))
    assert a.cfg.vocab_size == len(a.tokenizer)
    assert a.eos_ids == (151643, 151645)


def test_generation_config_eos_ids(hf_tiny, tmp_path):
    _, folder = hf_tiny
    shutil.copytree(folder, tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert load_model(str(tmp_path / "m"), "float32").eos_ids == (7, 9)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("llama", r"config.json: model_type 'llama' \(LlamaForCausalLM\) is not Qwen2"),
        ("truncated_config", r"config.json:\d+:\d+: not valid JSON \("),
        ("config_lacks_key", r"config.json lacks 'hidden_size'"),
        ("no_weights", "no \\*.safetensors weights in"),
        ("bin_only", "pickle weights"),
        ("remote_code", "trust_remote_code"),
        ("no_config", "no config.json"),
        ("dtype", "unknown dtype 'float8'"),
        ("preset", "unknown random preset"),
        ("hub_offline", "cannot fetch"),
    ],
)
def test_bad_inputs_fail_with_one_line(case, message, tmp_path, hf_tiny, monkeypatch):
    _, folder = hf_tiny
    path, dtype = str(tmp_path / "m"), "float32"
    if case == "missing":
        path = str(tmp_path / "nope")
    elif case in (
        "llama",
        "bin_only",
        "remote_code",
        "no_config",
        "truncated_config",
        "config_lacks_key",
        "no_weights",
    ):
        shutil.copytree(folder, path)
        cfg = json.loads((tmp_path / "m" / "config.json").read_text())
        if case == "llama":
            cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
        if case == "remote_code":
            cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
        if case == "config_lacks_key":
            del cfg["hidden_size"]
        (tmp_path / "m" / "config.json").write_text(json.dumps(cfg)[: 100 if case == "truncated_config" else None])
        if case == "no_weights":
            (tmp_path / "m" / "model.safetensors").unlink()
        if case == "bin_only":
            (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
        if case == "no_config":
            (tmp_path / "m" / "config.json").unlink()
    elif case == "dtype":
        path, dtype = str(folder), "float8"
    elif case == "preset":
        path = "random:huge"
    elif case == "hub_offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        path = "nobody/not-a-model"
    with pytest.raises(ModelError, match=message) as e:
        load_model(path, dtype)
    assert "\n" not in str(e.value)


def test_hub_id_resolves_from_the_local_cache_offline(hf_tiny, tmp_path, monkeypatch):
    """No network here: a hub id must load from a populated Hugging Face cache."""
    model, folder = hf_tiny
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--someone--tiny-qwen2" / "snapshots" / commit
    shutil.copytree(folder, snap)
    (cache / "models--someone--tiny-qwen2" / "refs").mkdir()
    (cache / "models--someone--tiny-qwen2" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    lm = load_model("someone/tiny-qwen2", "float32")
    check_params(lm, torch_weights(model))
    assert lm.source == "someone/tiny-qwen2" and lm.folder == snap


def rewrite_weights(folder, edit) -> None:
    """Load model.safetensors as numpy, apply edit(tensors) and write it back."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def damage(folder, how: str) -> str:
    """Damage the copied checkpoint in `folder`; returns text the one-line error must contain."""
    st = folder / "model.safetensors"
    up, q_b = "model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.bias"
    if how == "missing_tensor":
        rewrite_weights(folder, lambda t: t.pop(up))
        return f"checkpoint has no tensor '{up}'"
    if how == "wrong_shape":
        rewrite_weights(folder, lambda t: t.__setitem__(up, t[up][:-1]))
        return f"tensor '{up}' has shape (159, 64), config.json implies (160, 64)"
    if how == "int_dtype":
        rewrite_weights(folder, lambda t: t.__setitem__(q_b, t[q_b].astype(np.int8)))
        return f"tensor '{q_b}' has unsupported dtype I8"
    data = st.read_bytes()
    if how == "truncated":  # an interrupted download
        st.write_bytes(data[: len(data) // 2])
    elif how == "cut_in_header":
        st.write_bytes(data[:100])
    elif how == "garbled_header":
        st.write_bytes(data[:8] + b"\xff" * 16 + data[24:])
    elif how == "not_json":
        st.write_bytes(data[:8] + b"x" + data[9:])
    elif how == "empty":
        st.write_bytes(b"")
    return f"{st} is not a readable safetensors file"


@pytest.mark.parametrize(
    "how",
    ["missing_tensor", "wrong_shape", "int_dtype", "truncated", "cut_in_header", "garbled_header", "not_json", "empty"],
)
def test_damaged_safetensors_fail_with_one_line_naming_the_culprit(how, hf_tiny, tmp_path):
    _, folder = hf_tiny
    shutil.copytree(folder, tmp_path / "m")
    expected = damage(tmp_path / "m", how)
    with pytest.raises(ModelError) as e:
        load_model(str(tmp_path / "m"), "float32")
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_float_dtype_is_cast_on_load(dtype, hf_tiny, tmp_path):
    """float16, float64 and bfloat16 tensors load into either dtype, exactly as numpy would cast them
    (narrowing is done on the host, widening by JAX)."""
    model, folder = hf_tiny
    shutil.copytree(folder, tmp_path / "m")
    stored = {
        "model.layers.2.mlp.gate_proj.weight": np.float16,
        "model.norm.weight": np.float64,
        "model.layers.0.mlp.down_proj.weight": jnp.bfloat16,
    }
    rewrite_weights(tmp_path / "m", lambda t: t.update({n: t[n].astype(d) for n, d in stored.items()}))
    lm = load_model(str(tmp_path / "m"), dtype)
    ref = torch_weights(model)
    got = {
        "model.layers.2.mlp.gate_proj.weight": lm.params["layers"][2]["gate_w"],
        "model.norm.weight": lm.params["final_norm"],
        "model.layers.0.mlp.down_proj.weight": lm.params["layers"][0]["down_w"],
    }
    for name, x in got.items():
        assert x.dtype == jnp.dtype(dtype), name
        want = ref[name].astype(stored[name]).astype(jnp.dtype(dtype))
        np.testing.assert_array_equal(np.asarray(x), want, err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loaded_weights_are_copies_not_views_of_the_file(dtype, hf_tiny, tmp_path):
    """Stored in the compute dtype, a tensor needs no cast, yet it must not alias the memory map (on a CPU,
    jax.device_put of a read-only array shares its memory): rewriting the file in place after loading
    leaves the loaded weights as they were."""
    model, folder = hf_tiny
    shutil.copytree(folder, tmp_path / "m")
    st = tmp_path / "m" / "model.safetensors"
    rewrite_weights(tmp_path / "m", lambda t: t.update({n: t[n].astype(jnp.dtype(dtype)) for n in t}))
    lm = load_model(str(tmp_path / "m"), dtype)
    loaded = {"embed": lm.params["embed"], "q_w": lm.params["layers"][1]["q_w"]}
    before = {k: np.asarray(v).copy() for k, v in loaded.items()}
    header = 8 + int.from_bytes(st.read_bytes()[:8], "little")
    with open(st, "r+b") as f:  # in place: the same inode, so a mapping of it would see the new bytes
        f.seek(header)
        f.write(b"\x7f" * (st.stat().st_size - header))
    for k, v in loaded.items():
        np.testing.assert_array_equal(np.asarray(v), before[k], err_msg=k)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(hf_tiny, tmp_path):
    """Ids past vocab_size would silently read clamped embedding rows: refuse, naming the folder."""
    _, folder = hf_tiny
    lm = load_model(str(folder), "float32")
    with pytest.raises(ModelError) as e:
        _ = lm.tokenizer
    assert str(e.value) == (
        f"{folder} has no tokenizer (tokenizer.json or vocab.json), and the packaged Qwen2 tokenizer's 151936 "
        f"tokens do not fit its vocab_size 512; copy the checkpoint's tokenizer files into it"
    )


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    """The packaged tokenizer as a checkpoint's own copy, and one whose config names a generic class."""
    own = tmp_path_factory.mktemp("own_tokenizer")
    shutil.copytree(PACKAGED_TOKENIZER, own, dirs_exist_ok=True)
    generic = tmp_path_factory.mktemp("generic_tokenizer")
    shutil.copytree(PACKAGED_TOKENIZER, generic, dirs_exist_ok=True)
    cfg = json.loads((generic / "tokenizer_config.json").read_text())
    (generic / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return own, generic


@pytest.mark.parametrize("which", ["packaged", "own", "generic"])
def test_the_tokenizer_is_the_one_autotokenizer_loads(tokenizer_folders, which):
    """load_tokenizer takes a short cut past AutoTokenizer for Qwen2 folders: it must give the same object."""
    from transformers import AutoTokenizer

    folder = {"packaged": None, "own": tokenizer_folders[0], "generic": tokenizer_folders[1]}[which]
    ours, ref = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder or PACKAGED_TOKENIZER))
    assert type(ours) is type(ref)
    assert ours.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
    assert (ours.chat_template, len(ours), ours.eos_token_id, ours.pad_token_id) == (
        ref.chat_template,
        len(ref),
        ref.eos_token_id,
        ref.pad_token_id,
    )
    chat = [{"role": "user", "content": "Input:\n0120\n3344\nOutput:"}]
    text = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text
    enc = ours(text, add_special_tokens=False, return_offsets_mapping=True)
    want = ref(text, add_special_tokens=False, return_offsets_mapping=True)
    assert (enc["input_ids"], enc["offset_mapping"]) == (want["input_ids"], want["offset_mapping"])
    ids = enc["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_loading_a_qwen2_tokenizer_never_imports_torch(tokenizer_folders):
    """AutoTokenizer imports torch (3.6 s here) when it is installed; harvest's run never needs it."""
    code = (
        "import sys\nfrom harvest.weights.checkpoint import load_tokenizer\n"
        f"load_tokenizer(None), load_tokenizer(__import__('pathlib').Path({str(tokenizer_folders[0])!r}))\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
