"""The JAX Qwen2 forward equals transformers' at float32 1e-4 on 500+ token prompts, at every hook point,
in prefill and in cached decode."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from harvest.engine.generate import GenerateConfig, Generator
from harvest.engine.hooks import HookError, parse_hooks
from harvest.engine.model import DECODE_BLOCK, cached_attention, decode_blocks
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
# The TransformerLens hook points that transformers' outputs do not give directly: caught by `hf_forward_tl`.
TL_HOOKS = [
    "hook_embed",
    "blocks.*.attn.hook_q",
    "blocks.*.attn.hook_k",
    "blocks.*.attn.hook_v",
    "blocks.*.attn.hook_z",
    "blocks.*.mlp.hook_pre",
    "blocks.*.mlp.hook_pre_linear",
    "ln_final.hook_normalized",
]


TL_BLOCK_KINDS = tuple(p.removeprefix("blocks.*.") for p in TL_HOOKS if p.startswith("blocks.*."))


def hf_forward_tl(model, ids):
    """`hf_forward` plus the TL_HOOKS, caught with extra torch forward hooks on transformers' modules:
    q/k/v_proj outputs (before RoPE, with bias), o_proj's input (attn.hook_z), gate_proj and up_proj
    outputs, the embeddings, and the final norm's input normalised without its weight."""
    caught, handles = {}, []

    def catch(module, name, what):
        def hook(m, args, out):
            caught[name] = (out if what == "out" else args[0])[0].detach().numpy().copy()

        handles.append(module.register_forward_hook(hook))

    catch(model.model.embed_tokens, "hook_embed", "out")
    catch(model.model.norm, "ln_final.input", "in")
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        catch(attn.q_proj, f"blocks.{i}.attn.hook_q", "out")
        catch(attn.k_proj, f"blocks.{i}.attn.hook_k", "out")
        catch(attn.v_proj, f"blocks.{i}.attn.hook_v", "out")
        catch(attn.o_proj, f"blocks.{i}.attn.hook_z", "in")
        catch(mlp.gate_proj, f"blocks.{i}.mlp.hook_pre", "out")
        catch(mlp.up_proj, f"blocks.{i}.mlp.hook_pre_linear", "out")
    try:
        out, base = hf_forward(model, ids)
    finally:
        for h in handles:
            h.remove()
    x = torch.from_numpy(caught.pop("ln_final.input"))
    eps = model.config.rms_norm_eps
    caught["ln_final.hook_normalized"] = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).numpy()
    return out, base | caught


@pytest.mark.parametrize("path", ["forward", "chunked-prefill-128", "one-chunk-1024"])
def test_prefill_matches_transformers(hf_tiny, loaded_tiny, path):
    """The full forward and the chunked prefill (600 tokens: 5 chunks of 128 reading earlier chunks
    from the cache, or one chunk) both equal transformers at every hook."""
    model, _ = hf_tiny
    lm = loaded_tiny
    n = 600
    ids = random_ids(n, seed=1)
    out, caught = hf_forward_tl(model, ids)
    hooks = parse_hooks(ALL_KINDS + TL_HOOKS, lm.cfg)
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
        for kind in ("hook_attn_out", "hook_mlp_out", "mlp.hook_post") + TL_BLOCK_KINDS:
            name = f"blocks.{layer}.{kind}"
            np.testing.assert_allclose(acts[name], caught[name], atol=ATOL, rtol=0, err_msg=name)
        mid = acts[f"blocks.{layer}.hook_resid_pre"] + acts[f"blocks.{layer}.hook_attn_out"]
        np.testing.assert_allclose(acts[f"blocks.{layer}.hook_resid_mid"], mid, atol=1e-6, rtol=0)
    for name in ("hook_embed", "ln_final.hook_normalized"):
        np.testing.assert_allclose(acts[name], caught[name], atol=ATOL, rtol=0, err_msg=name)
    np.testing.assert_array_equal(acts["hook_embed"], acts["blocks.0.hook_resid_pre"])
    # hook_normalized is the final norm before its weight: times the weight, transformers' last hidden state.
    w, last = model.model.norm.weight.detach().numpy(), out.hidden_states[-1][0].numpy()
    np.testing.assert_allclose(acts["ln_final.hook_normalized"] * w, last, atol=ATOL, rtol=0)
    for h in hooks:
        assert acts[h.name].shape == (n, h.width(lm.cfg)), h.name
    # The activations are far from trivial, so 1e-4 is a real test.
    assert np.abs(acts[f"blocks.{L - 1}.hook_resid_post"]).mean() > 0.1
    for name in caught:
        assert np.abs(caught[name]).mean() > 0.05, name


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


def test_tl_hooks_cached_decode_equals_full_forward_and_transformers(hf_tiny, loaded_tiny):
    """Every TL_HOOKS point captured while decoding (one token at a time from the KV cache, two slots of
    different lengths, a prompt over two prefill chunks) equals the full forward pass over prompt + answer,
    and transformers' forward over the same tokens."""
    model, _ = hf_tiny
    lm = loaded_tiny
    hooks = parse_hooks(TL_HOOKS, lm.cfg)
    prompts = [list(random_ids(150, 21)), list(random_ids(5, 22))]
    gcfg = GenerateConfig(
        2, 2, 64, max_prompt_len=150, max_new_tokens=12, fixed_length=True, prefill_hooks=hooks, decode_hooks=hooks
    )
    outs = Generator(lm.cfg, lm.params, gcfg).generate(prompts, [0, 1])
    for prompt, done in zip(prompts, outs):
        assert len(done.tokens) == 12
        full = np.array(prompt + list(done.tokens), np.int32)
        _, acts = forward(lm.cfg, lm.params, jnp.asarray(full[None]), hooks=hooks)
        _, caught = hf_forward_tl(model, full)
        n = len(prompt)
        for h in hooks:
            ref = np.asarray(acts[h.name])[0]
            assert done.decode_acts[h.name].shape == (12, h.width(lm.cfg)), h.name
            np.testing.assert_allclose(done.prefill_acts[h.name], ref[:n], atol=ATOL, rtol=0, err_msg=h.name)
            np.testing.assert_allclose(done.decode_acts[h.name], ref[n:], atol=ATOL, rtol=0, err_msg=h.name)
            np.testing.assert_allclose(done.decode_acts[h.name], caught[h.name][n:], atol=ATOL, rtol=0, err_msg=h.name)


def test_prefill_only_runs_no_layer_for_hook_embed_and_all_for_ln_final(hf_tiny, loaded_tiny):
    lm = loaded_tiny
    model, _ = hf_tiny
    ids = random_ids(100, 23)  # two chunks of 64: the second would read the (absent) cache
    _, caught = hf_forward_tl(model, ids)
    for pattern, depth in (("hook_embed", 0), ("ln_final.hook_normalized", lm.cfg.n_layers)):
        hooks = parse_hooks(pattern, lm.cfg)
        gcfg = GenerateConfig(2, 2, 64, max_prompt_len=100, max_new_tokens=0, prefill_hooks=hooks)
        gen = Generator(lm.cfg, lm.params, gcfg)
        assert gen.cfg.n_layers == depth and gen.params["layers"] == ()  # nothing decodes: the stack is enough
        assert gen.params.get("stacked", {"q_w": np.zeros((0,))})["q_w"].shape[0] == depth
        (done,) = gen.generate([ids], [0])
        np.testing.assert_allclose(done.prefill_acts[pattern], caught[pattern], atol=ATOL, rtol=0, err_msg=pattern)


def test_ln_final_refuses_a_truncated_model(loaded_tiny):
    lm = loaded_tiny
    hooks = parse_hooks("ln_final.hook_normalized", lm.cfg)
    cfg = dataclasses.replace(lm.cfg, n_layers=1)
    params = {**lm.params, "layers": lm.params["layers"][:1]}
    with pytest.raises(HookError, match="ln_final.hook_normalized"):
        forward(cfg, params, jnp.zeros((1, 8), jnp.int32), hooks=hooks)


def direct_decode_attention(q, k, v, k_cache, v_cache, layer, length):
    """The definition, in float64: each head's softmax over its layer's cache columns [0, length) and its own key."""
    b, _, h, dh = q.shape
    g = h // k.shape[2]
    out = np.zeros((b, 1, h, dh))
    for r in range(b):
        for head in range(h):
            kv = head // g
            keys = np.concatenate([k_cache[layer, r, kv, : length[r]], k[r, 0, kv][None]])
            vals = np.concatenate([v_cache[layer, r, kv, : length[r]], v[r, 0, kv][None]])
            s = keys @ q[r, 0, head] / np.sqrt(dh)
            p = np.exp(s - s.max())
            out[r, 0, head] = p @ vals / p.sum()
    return out


def test_decode_attention_reads_its_layer_below_length_and_its_own_key():
    """A decode query attends to its layer's cache columns [0, length) and to its own key and value (not
    yet in the cache): equal to the direct softmax over exactly those, in one pass and bounded to the blocks needed
    across block edges, in float32 and bfloat16. Columns from `length` on and the other layers never count
    (they are poisoned), and a cache that is not a whole number of blocks gets the single pass."""
    rng = np.random.default_rng(0)
    n_layers, layer, b, kh, g, dh = 3, 1, 6, 2, 3, 16
    s_max = 4 * DECODE_BLOCK
    q = rng.normal(size=(b, 1, kh * g, dh))
    k, v = rng.normal(size=(b, 1, kh, dh)) * 3, rng.normal(size=(b, 1, kh, dh))
    k_cache, v_cache = rng.normal(size=(n_layers, b, kh, s_max, dh)) * 3, rng.normal(size=(n_layers, b, kh, s_max, dh))
    length = np.array([0, 1, DECODE_BLOCK - 1, DECODE_BLOCK, 2 * DECODE_BLOCK + 5, s_max - 1], np.int32)
    past = np.arange(s_max)[None, None, :, None] >= length[:, None, None, None]  # [B, 1, S, 1]
    poisoned = [np.full_like(c, sign * 1e4) for c, sign in ((k_cache, 1), (v_cache, -1))]
    for c, p in zip((k_cache, v_cache), poisoned):
        p[layer] = np.where(past, p[layer], c[layer])
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
        args = [jnp.asarray(a, dtype) for a in (q, k, v, *poisoned)]
        want = direct_decode_attention(*(np.asarray(a, np.float64) for a in args), layer, length)
        for blocks in (None, decode_blocks(jnp.int32(length.max())), decode_blocks(jnp.int32(s_max))):
            got = cached_attention(*args, layer, length, blocks)
            np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol, rtol=0)
        # blocks below some rows: the rows within them are still exact (the others are dead slots: ignored)
        got = cached_attention(*args, layer, length, jnp.int32(1))
        np.testing.assert_allclose(np.asarray(got, np.float64)[:4], want[:4], atol=tol, rtol=0)
    odd = s_max - 7  # not a whole number of blocks: one pass, whatever the blocks
    short = [jnp.asarray(c[..., :odd, :], jnp.float32) for c in poisoned]
    length = np.minimum(length, odd)
    want = direct_decode_attention(q, k, v, *(np.asarray(c, np.float64) for c in short), layer, length)
    qkv = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    for blocks in (None, decode_blocks(jnp.int32(odd))):
        got = cached_attention(*qkv, *short, layer, length, blocks)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-5, rtol=0)
