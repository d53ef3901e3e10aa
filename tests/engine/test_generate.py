"""Cached, batched, jitted generation equals a full forward pass and transformers' generate."""

import jax.numpy as jnp
import numpy as np
import pytest

from harvest.engine import decode as decode_mod
from harvest.engine import prefill as prefill_mod
from harvest.engine.generate import GenerateConfig, Generator
from harvest.engine.hooks import parse_hooks
from harvest.engine.model import logits as lm_logits
from harvest.engine.sampling import SamplingConfig
from harvest.engine.stopping import STOP_EOS, STOP_LENGTH, STOP_STRING
from helpers.models import random_ids

torch = pytest.importorskip("torch")

ATOL = 1e-4


def gen(lm, eos_ids=(), **kw):
    base = dict(batch_size=4, max_new_tokens=40, buckets=(64, 128, 256, 384, 512, 768))
    return Generator(lm.cfg, lm.params, GenerateConfig(**{**base, **kw}), eos_ids=eos_ids)


def last_hook(lm):
    return parse_hooks([f"blocks.{lm.cfg.n_layers - 1}.hook_resid_post", "blocks.0.mlp.hook_post"], lm.cfg)


def test_cached_decode_equals_full_forward(loaded_tiny):
    lm = loaded_tiny
    hooks = last_hook(lm)
    g = gen(lm, fixed_length=True, prefill_hooks=hooks, decode_hooks=hooks, batch_size=2)
    prompts = [list(random_ids(520, 3)), list(random_ids(77, 4))]
    out = g.generate(prompts, [0, 1]).to_host()
    for row, prompt in enumerate(prompts):
        gen_ids = out.generated(row)
        assert len(gen_ids) == 40
        full = np.array(prompt + list(gen_ids), np.int32)[None]
        n = full.shape[1]
        _, _, acts = prefill_mod.prefill(
            lm.cfg,
            lm.params,
            jnp.asarray(full),
            jnp.asarray([n], jnp.int32),
            hooks=hooks,
            cache_len=n,
            max_chunk=128 if n % 128 == 0 else 1024,
        )
        for h in hooks:
            ref = np.asarray(acts[h.name])[0, len(prompt) :]
            np.testing.assert_allclose(out.decode_acts[h.name][row], ref, atol=ATOL, rtol=0, err_msg=h.name)
            np.testing.assert_allclose(
                out.prefill_acts[h.name][row, : len(prompt)],
                np.asarray(acts[h.name])[0, : len(prompt)],
                atol=ATOL,
                rtol=0,
            )
        # Each greedy token is the argmax of the full forward pass at the position before it.
        resid = acts[hooks[-1].name] if hooks[-1].kind == "resid_post" else acts[hooks[0].name]
        full_logits = np.asarray(lm_logits(lm.cfg, lm.params, resid[0]))
        np.testing.assert_array_equal(full_logits[len(prompt) - 1 : n - 1].argmax(-1), gen_ids)


def test_padded_batch_equals_single_rows(loaded_tiny):
    lm = loaded_tiny
    hooks = last_hook(lm)
    prompts = [list(random_ids(n, 10 + n)) for n in (37, 300, 129)]
    batched = gen(lm, prefill_hooks=hooks, decode_hooks=hooks, fixed_length=True).generate(prompts, [0, 1, 2]).to_host()
    single = gen(lm, prefill_hooks=hooks, decode_hooks=hooks, fixed_length=True, batch_size=1)
    for row, prompt in enumerate(prompts):
        alone = single.generate([prompt], [row]).to_host()
        np.testing.assert_array_equal(batched.generated(row), alone.generated(0))
        for h in hooks:
            np.testing.assert_allclose(
                batched.prefill_acts[h.name][row, : len(prompt)],
                alone.prefill_acts[h.name][0, : len(prompt)],
                atol=ATOL,
                rtol=0,
            )
            np.testing.assert_allclose(
                batched.decode_acts[h.name][row], alone.decode_acts[h.name][0], atol=ATOL, rtol=0
            )


def test_greedy_equals_transformers_generate_with_per_row_eos(hf_tiny, loaded_tiny):
    model, _ = hf_tiny
    lm = loaded_tiny
    prompts = [list(random_ids(n, 20 + n)) for n in (50, 120, 33)]
    free = gen(lm, fixed_length=True).generate(prompts, [0, 1, 2]).to_host()
    eos = int(free.generated(0)[12])  # row 0 stops at (or before) step 12; others may run to the end
    out = gen(lm, eos_ids=(eos,)).generate(prompts, [0, 1, 2]).to_host()
    stopped = 0
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            res = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=40,
                eos_token_id=eos,
                pad_token_id=eos,
                output_logits=True,
                return_dict_in_generate=True,
            )
        ref = res.sequences[0, len(prompt) :].tolist()
        if eos in ref:
            ref = ref[: ref.index(eos) + 1]
        ours = out.generated(row).tolist()
        assert ours == ref, f"row {row}"
        ref_lp = sum(torch.log_softmax(res.logits[t][0], -1)[tok].item() for t, tok in enumerate(ref))
        assert abs(float(out.logprob[row]) - ref_lp) < 1e-3
        assert len(ours) >= 13 or ours[-1] == eos
        if ours[-1] == eos:
            stopped += 1
            assert out.stop_reason[row] == STOP_EOS
        else:
            assert len(ours) == 40 and out.stop_reason[row] == STOP_LENGTH
    assert stopped >= 1 and len(out.generated(0)) <= 13


def test_stop_string_across_tokens(loaded_tiny):
    lm = loaded_tiny
    token_bytes = tuple(f"{i}|".encode() for i in range(lm.cfg.vocab_size))
    prompts = [list(random_ids(40, 5)), list(random_ids(90, 6))]
    free = gen(lm, fixed_length=True, batch_size=2).generate(prompts, [0, 1]).to_host()
    g = free.generated(0)
    pattern = f"|{g[7]}|"  # spans the end of token 6 and all of token 7
    text = b""
    for t, tok in enumerate(g):
        text += token_bytes[tok]
        if pattern.encode() in text:
            expect = t + 1
            break
    cfg = GenerateConfig(batch_size=2, max_new_tokens=40, stop_strings=(pattern,), buckets=(64, 128))
    out = Generator(lm.cfg, lm.params, cfg, token_bytes=token_bytes).generate(prompts, [0, 1]).to_host()
    assert len(out.generated(0)) == expect <= 8
    assert out.stop_reason[0] == STOP_STRING
    np.testing.assert_array_equal(out.generated(0), g[:expect])


def test_sampling_is_seeded_per_row(loaded_tiny):
    lm = loaded_tiny
    prompts = [list(random_ids(30, 7)), list(random_ids(60, 8))]
    s = SamplingConfig(temperature=1.0, top_k=50, top_p=0.9)
    a = gen(lm, sampling=s, seed=1, fixed_length=True).generate(prompts, [0, 1]).to_host()
    b = gen(lm, sampling=s, seed=1, fixed_length=True).generate(prompts, [0, 1]).to_host()
    c = gen(lm, sampling=s, seed=2, fixed_length=True).generate(prompts, [0, 1]).to_host()
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    # A sequence samples the same tokens whatever batch slot it lands in.
    swapped = gen(lm, sampling=s, seed=1, fixed_length=True).generate(prompts[::-1], [1, 0]).to_host()
    np.testing.assert_array_equal(swapped.generated(1), a.generated(0))
    greedy = gen(lm, fixed_length=True).generate(prompts, [0, 1]).to_host()
    for special in (SamplingConfig(temperature=0.7, top_k=1), SamplingConfig(temperature=1e-6)):
        got = gen(lm, sampling=special, seed=3, fixed_length=True).generate(prompts, [0, 1]).to_host()
        np.testing.assert_array_equal(got.tokens, greedy.tokens)


def test_no_recompile_within_a_bucket(loaded_tiny):
    lm = loaded_tiny
    hooks = last_hook(lm)
    g = gen(lm, prefill_hooks=hooks, decode_hooks=hooks, max_new_tokens=8)
    g.generate([list(random_ids(100, 1)), list(random_ids(120, 2))], [0, 1]).to_host()
    sizes = (prefill_mod.prefill._cache_size(), decode_mod.decode._cache_size())
    g.generate([list(random_ids(101, 3))], [2]).to_host()  # fewer rows, same bucket
    g.generate([list(random_ids(n, n)) for n in (65, 70, 128, 99)], [3, 4, 5, 6]).to_host()
    assert (prefill_mod.prefill._cache_size(), decode_mod.decode._cache_size()) == sizes
    g.generate([list(random_ids(300, 4))], [7]).to_host()  # a new bucket compiles once
    assert prefill_mod.prefill._cache_size() == sizes[0] + 1


def test_rejects_bad_batches(loaded_tiny):
    g = gen(loaded_tiny, batch_size=2)
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        g.generate([[1] * 800], [0])
    with pytest.raises(ValueError, match="prompts for a batch of 2"):
        g.generate([[1], [2], [3]], [0, 1, 2])
    with pytest.raises(ValueError, match="empty prompt"):
        g.generate([[]], [0])
    with pytest.raises(ValueError, match="multiples of 128"):
        GenerateConfig(buckets=(64, 1000), attention_chunk=512)
