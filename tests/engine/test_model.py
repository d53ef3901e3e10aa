"""The JAX Qwen2 forward equals transformers' at float32 1e-4 on 500+ token prompts."""

import jax.numpy as jnp
import numpy as np
import pytest

from harvest.engine.generate import GenerateConfig, Generator
from harvest.engine.hooks import parse_hooks
from harvest.engine.model import logits as lm_logits
from harvest.engine.prefill import forward
from helpers.models import hf_forward, random_ids

torch = pytest.importorskip("torch")

ATOL = 1e-4


ALL_KINDS = [
    "blocks.*.hook_resid_pre",
    "blocks.*.hook_resid_post",
    "blocks.*.hook_attn_out",
    "blocks.*.hook_mlp_out",
    "blocks.*.mlp.hook_post",
    "blocks.*.hook_resid_mid",
]


@pytest.mark.parametrize("path", ["forward", "chunked-prefill-128", "one-chunk-1024"])
def test_prefill_matches_transformers(hf_tiny, loaded_tiny, path):
    """The full forward and the chunked prefill (600 tokens: 5 chunks of 128 reading earlier chunks
    from the cache, or one chunk) both equal transformers at every hook."""
    model, _ = hf_tiny
    lm = loaded_tiny
    n = 600
    ids = random_ids(n, seed=1)
    out, caught = hf_forward(model, ids)
    hooks = parse_hooks(ALL_KINDS, lm.cfg)
    if path == "forward":
        x, acts = forward(lm.cfg, lm.params, jnp.asarray(ids[None]), hooks=hooks)
        logits = lm_logits(lm.cfg, lm.params, x[0, -1])
        np.testing.assert_allclose(np.asarray(logits), out.logits[0, -1].numpy(), atol=ATOL, rtol=0)
        acts = {k: np.asarray(v)[0] for k, v in acts.items()}
    else:
        chunk = int(path.rsplit("-", 1)[1])
        gcfg = GenerateConfig(1, 1, chunk, max_prompt_len=n, max_new_tokens=1, prefill_hooks=hooks)
        (done,) = Generator(lm.cfg, lm.params, gcfg).generate([ids], [0])
        assert done.tokens[0] == int(out.logits[0, -1].argmax())  # the first token comes from prefill's logits
        acts = done.prefill_acts
    L = lm.cfg.n_layers
    for layer in range(L):
        np.testing.assert_allclose(
            acts[f"blocks.{layer}.hook_resid_pre"], out.hidden_states[layer][0].numpy(), atol=ATOL, rtol=0
        )
        if layer < L - 1:  # transformers' last entry is after the final norm
            np.testing.assert_allclose(
                acts[f"blocks.{layer}.hook_resid_post"], out.hidden_states[layer + 1][0].numpy(), atol=ATOL, rtol=0
            )
        for kind in ("hook_attn_out", "hook_mlp_out", "mlp.hook_post"):
            name = f"blocks.{layer}.{kind}"
            np.testing.assert_allclose(acts[name], caught[name], atol=ATOL, rtol=0, err_msg=name)
        mid = acts[f"blocks.{layer}.hook_resid_pre"] + acts[f"blocks.{layer}.hook_attn_out"]
        np.testing.assert_allclose(acts[f"blocks.{layer}.hook_resid_mid"], mid, atol=1e-6, rtol=0)
    # The activations are far from trivial, so 1e-4 is a real test.
    assert np.abs(acts[f"blocks.{L - 1}.hook_resid_post"]).mean() > 0.1


def test_final_layer_resid_post_normed_equals_last_hidden_state(hf_tiny, loaded_tiny):
    from harvest.engine.model import rms_norm

    model, _ = hf_tiny
    lm = loaded_tiny
    ids = random_ids(64, seed=2)
    out, _ = hf_forward(model, ids)
    hooks = parse_hooks([f"blocks.{lm.cfg.n_layers - 1}.hook_resid_post"], lm.cfg)
    _, acts = forward(lm.cfg, lm.params, jnp.asarray(ids[None]), hooks=hooks)
    normed = rms_norm(list(acts.values())[0][0], lm.params["final_norm"], lm.cfg.rms_norm_eps)
    np.testing.assert_allclose(np.asarray(normed), out.hidden_states[-1][0].numpy(), atol=ATOL, rtol=0)
