"""Generation on (data, model) meshes of 8 fake CPU devices equals the one-device run.

XLA_FLAGS must be set before JAX starts, so the meshes run in a subprocess. A tiny model with 8 query and
4 KV heads runs on data=8, data=4 x model=2 and data=2 x model=4 (KV heads split over `model`); a model
with 2 KV heads runs on data=2 x model=4 (KV heads replicated). Rows stop at different steps (EOS is
the most frequent token), so slots are refilled and the tail pool runs. Two prompts share a prefix with
another, so a slot's cache is copied into another's across the mesh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from harvest.engine.sharding import mesh_shape
from harvest.errors import FieldError
from helpers.runs import ROOT

SCRIPT = r"""
import collections, dataclasses, json, logging, re, warnings
import jax, numpy as np

warnings.filterwarnings("error", message=".*donated buffers.*")  # a donation XLA could not use: the pool held twice
from harvest.engine.config import ModelConfig
from harvest.engine.generate import CompileCounter, GenerateConfig, Generator
from harvest.engine.hooks import parse_hooks
from harvest.engine.params import init_params
from harvest.engine.sharding import make_mesh

assert jax.device_count() == 8, jax.devices()
ENGINE = {"prefill_chunk", "fork", "decode_segment", "compact", "read_slot"}
compiled = []  # names of the XLA programs compiled, from JAX's own compile log


class Compiles(logging.Handler):
    def emit(self, record):
        m = re.match(r"Finished XLA compilation of jit\((\w+)\)", record.getMessage())
        if m:
            compiled.append(m[1])


logging.getLogger("jax._src.dispatch").addHandler(Compiles())
logging.getLogger("jax._src.dispatch").setLevel(logging.DEBUG)
spec = lambda a: str(getattr(a.sharding, "spec", "one device"))
out = {}
for kv in (4, 2):
    cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=8, n_kv_heads=kv, head_dim=16, d_mlp=160,
                      rope_theta=1e6, rms_norm_eps=1e-6, tie_embeddings=False)
    params = init_params(cfg, kv, jax.numpy.float32)
    params = jax.tree.map(lambda x: x * (6 if x.ndim == 2 else 1), params)  # peaked logits: varied tokens
    hooks = parse_hooks(["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post", "blocks.1.attn.hook_z"], cfg)
    rng = np.random.default_rng(kv)
    prompts = [rng.integers(0, 512, n).astype(np.int32) for n in (37, 300, 129, 5, 200, 64)]
    # shared prefixes: a copy of a prompt (its whole cache copied) and one sharing two chunks of it
    prompts += [prompts[1].copy(), np.concatenate([prompts[1][:150], rng.integers(0, 512, 40).astype(np.int32)])]
    ids = list(range(len(prompts)))
    g = GenerateConfig(batch_size=8, decode_slots=16, prefill_chunk=64, max_prompt_len=320, max_new_tokens=12,
                       tail_slots=8, segment_steps=4, prefill_hooks=hooks, decode_hooks=hooks)
    free = Generator(cfg, params, g).generate(prompts, ids)
    # EOS: the most frequent token whose first occurrences differ most between rows (rows stop at many steps)
    firsts = lambda t: len({next((i for i, x in enumerate(d.tokens) if x == t), -1) for d in free})
    eos = max(np.unique(np.concatenate([d.tokens for d in free])).tolist(), key=firsts)
    meshes = [("1", None), ("8", {"data": -1}), ("4x2", {"data": 4, "model": 2}), ("2x4", {"data": 2, "model": 4})]
    for name, axes in meshes if kv == 4 else [meshes[0], meshes[3]]:
        gen = Generator(cfg, params, g, eos_ids=(eos,), mesh=None if axes is None else make_mesh(axes))
        jax.clear_caches()  # count every engine program the first stream compiles
        compiled.clear()
        first = gen.generate(prompts, ids)
        programs = dict(collections.Counter(n for n in compiled if n in ENGINE))
        compiled.clear()
        mesh = gen.placement and gen.placement.mesh
        full_pool = Generator(cfg, params, dataclasses.replace(g, tail_slots=0), eos_ids=(eos,), mesh=mesh)
        full_pool.generate(prompts[:2], ids[:2])  # ends with the full pool: its state is kept
        before = CompileCounter.count
        again = gen.generate([p[: len(p) // 2 + 1] for p in prompts[::-1]], [i + 100 for i in ids[::-1]])
        out[f"kv{kv}-{name}"] = {
            "tokens": [d.tokens.tolist() for d in first],
            "again": [d.tokens.tolist() for d in again],
            "acts": {str(d.sequence_id): {h.name: [d.prefill_acts[h.name].tolist(), d.decode_acts[h.name].tolist()]
                                          for h in hooks} for d in first},
            "recompiles": CompileCounter.count - before,
            "programs": programs,  # compiled variants of each engine program in the first stream
            "tail_steps": gen.timings["tail_steps"],
            "narrow": gen.narrow,
            "narrow_calls": gen.timings["narrow_prefill_calls"],
            "shared_prompt_tokens": gen.timings["shared_prompt_tokens"],
            "k_w": spec(gen.params["layers"][0]["k_w"]),
            "q_w": spec(gen.params["layers"][0]["q_w"]),
            "stacked_k_w": spec(gen.params["stacked"]["k_w"]),  # prefill's copy: split like the layers'
            "stacked_q_w": spec(gen.params["stacked"]["q_w"]),
            "cache": spec(full_pool._state.cache[0]),
        }
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def mesh_runs():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))[7:])


def rel_err(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)) if a.size else 0.0


@pytest.mark.parametrize("name", ["kv4-8", "kv4-4x2", "kv4-2x4", "kv2-2x4"])
def test_mesh_run_equals_one_device(mesh_runs, name):
    one, got = mesh_runs[name.split("-")[0] + "-1"], mesh_runs[name]
    assert got["tokens"] == one["tokens"] and got["again"] == one["again"]
    assert len({len(t) for t in one["tokens"]}) > 2, "the test needs rows that stop at different steps"
    for seq, hooks in one["acts"].items():
        for hook, phases in hooks.items():
            for want, have in zip(phases, got["acts"][seq][hook]):
                assert rel_err(want, have) < 1e-5, (seq, hook)
    assert got["recompiles"] == 0  # other prompt lengths, other ids, the same programs
    # no program compiled again for another layout; prefill once per call width (the default narrow width,
    # 2 of 8 lanes, is 0 where it cannot split over `data`)
    assert {k: n for k, n in got["programs"].items() if k != "prefill_chunk"} == {
        k: n for k, n in one["programs"].items() if k != "prefill_chunk"
    }
    assert got["narrow"] == (2 if name.endswith("2x4") else 0) and one["narrow"] == 2 and one["narrow_calls"] > 0
    assert got["programs"]["prefill_chunk"] == 1 + (got["narrow_calls"] > 0)
    assert (got["narrow_calls"] > 0) == (got["narrow"] > 0)
    assert set(one["programs"]) == {
        "prefill_chunk",
        "fork",
        "decode_segment",
        "compact",
        "read_slot",
    }
    assert got["tail_steps"] > 0
    # both streams: the copy (300) and two chunks (128), then their halves: 151 and one chunk (64)
    assert got["shared_prompt_tokens"] == one["shared_prompt_tokens"] == 300 + 128 + 151 + 64


def test_weights_and_cache_split_by_their_heads(mesh_runs):
    split, replicated = mesh_runs["kv4-2x4"], mesh_runs["kv2-2x4"]
    assert split["k_w"] == str(P("model", None)) and split["cache"] == str(P(None, "data", "model"))
    # 2 KV heads do not split over model=4: K/V weights and cache are replicated over `model`
    assert replicated["k_w"] == str(P(None, None)) and "model" not in replicated["cache"]
    assert replicated["q_w"] == str(P("model", None))  # the 8 query heads still split
    # prefill's stacked copy: the same split behind its layer axis
    assert split["stacked_k_w"] == split["stacked_q_w"] == replicated["stacked_q_w"] == str(P(None, "model", None))
    assert replicated["stacked_k_w"] == str(P(None, None, None))
    assert "data" in mesh_runs["kv4-8"]["cache"] and "model" not in mesh_runs["kv4-8"]["cache"]


def test_mesh_shape():
    assert mesh_shape({"data": -1}, 8) == {"data": 8, "model": 1}
    assert mesh_shape({"model": 2}, 8) == {"data": 4, "model": 2}
    assert mesh_shape({"data": 2, "model": 2}, 8) == {"data": 2, "model": 2}  # a sub-mesh of the devices
    for axes, message in [
        ({"data": 3, "model": 3}, r"mesh: .* needs 9 devices, this process has 8"),
        ({"data": -1, "model": 3}, r"mesh: 8 devices do not split into 3 x -1"),
        ({"data": 0}, r"mesh\.data: 0 is impossible"),
        ({"rows": 2}, r"mesh: axes are data and model"),
        ({"data": -1, "model": -1}, r"mesh: at most one axis may be -1"),
    ]:
        with pytest.raises(FieldError, match=message):
            mesh_shape(axes, 8)
