"""Continuous batching equals a full forward pass, each prompt alone, and transformers' generate."""

import dataclasses
import weakref

import jax.numpy as jnp
import numpy as np
import pytest

from harvest.engine.generate import CompileCounter, GenerateConfig, Generator
from harvest.engine.hooks import parse_hooks
from harvest.engine.model import logits as lm_logits
from harvest.engine.prefill import forward
from harvest.engine.sampling import SamplingConfig
from harvest.engine.stopping import STOP_EOS, STOP_LENGTH, STOP_STRING
from harvest.errors import FieldError
from harvest.floats import FloatOverflowError, float_dtype
from helpers.models import random_ids

torch = pytest.importorskip("torch")

ATOL = 1e-4


def gen(lm, eos_ids=(), **kw):
    base = dict(batch_size=2, decode_slots=3, prefill_chunk=64, max_prompt_len=600, max_new_tokens=40)
    return Generator(lm.cfg, lm.params, GenerateConfig(**{**base, **kw}), eos_ids=eos_ids)


def hooks_of(lm):
    return parse_hooks([f"blocks.{lm.cfg.n_layers - 1}.hook_resid_post", "blocks.0.mlp.hook_post"], lm.cfg)


def assert_matches_full_forward(lm, hooks, prompt, done, **edit):
    """A generated row equals the full forward pass over prompt + its tokens (under the same edit, if any):
    its prefill and decode activations, and each greedy token is the argmax at the position before it."""
    full = jnp.asarray(np.array(list(prompt) + list(done.tokens), np.int32)[None])
    x, acts = forward(lm.cfg, lm.params, full, hooks=hooks, **edit)
    n = len(prompt)
    for h in hooks:
        ref = np.asarray(acts[h.name])[0]
        np.testing.assert_allclose(done.prefill_acts[h.name], ref[:n], atol=ATOL, rtol=0, err_msg=h.name)
        np.testing.assert_allclose(done.decode_acts[h.name], ref[n:], atol=ATOL, rtol=0, err_msg=h.name)
    full_logits = np.asarray(lm_logits(lm.cfg, lm.params, x[0]))
    np.testing.assert_array_equal(full_logits[n - 1 : -1].argmax(-1), done.tokens)


def test_cached_decode_equals_full_forward(loaded_tiny):
    lm = loaded_tiny
    hooks = hooks_of(lm)
    prompts = [list(random_ids(520, 3)), list(random_ids(77, 4)), list(random_ids(5, 9))]
    outs = gen(lm, fixed_length=True, prefill_hooks=hooks, decode_hooks=hooks).generate(prompts, [0, 1, 2])
    for prompt, done in zip(prompts, outs):
        assert len(done.tokens) == 40 and done.stop_reason == STOP_LENGTH
        assert_matches_full_forward(lm, hooks, prompt, done)


def test_pool_size_and_admission_order_never_change_a_sequence(loaded_tiny):
    """Rows stop at different steps (a frequent token is EOS), so slots are refilled mid-stream; every
    sequence still equals the same prompt run alone, whatever the pool, lanes and order."""
    lm = loaded_tiny
    hooks = hooks_of(lm)
    lengths = (37, 300, 129, 5, 200, 64, 65)
    prompts = [list(random_ids(n, 10 + n)) for n in lengths]
    ids = list(range(len(prompts)))
    free = gen(lm, fixed_length=True).generate(prompts, ids)
    eos = int(np.bincount(np.concatenate([d.tokens for d in free])).argmax())
    kw = dict(eos_ids=(eos,), prefill_hooks=hooks, decode_hooks=hooks)
    alone = gen(lm, batch_size=1, decode_slots=1, **kw)
    ref = {i: alone.generate([p], [i])[0] for i, p in zip(ids, prompts)}
    assert len({len(d.tokens) for d in ref.values()}) > 2, "the test needs rows that stop at different steps"
    pools = (
        gen(lm, **kw),
        gen(lm, batch_size=3, decode_slots=4, prefill_chunk=32, tail_slots=2, segment_steps=4, **kw),
        # 8 lanes: full calls while most prompts prefill, then 2-lane calls once at most 4 are left
        gen(lm, batch_size=8, decode_slots=8, prefill_chunk=32, narrow_lanes=2, segment_steps=4, **kw),
    )
    for pool in pools:
        for order in (ids, ids[::-1]):
            got = pool.generate([prompts[i] for i in order], order)
            for done in got:
                want = ref[done.sequence_id]
                np.testing.assert_array_equal(done.tokens, want.tokens)
                assert (done.stop_reason, done.prompt_length) == (want.stop_reason, want.prompt_length)
                assert abs(done.logprob - want.logprob) < 1e-4
                for h in hooks:
                    np.testing.assert_allclose(done.prefill_acts[h.name], want.prefill_acts[h.name], atol=1e-5, rtol=0)
                    np.testing.assert_allclose(done.decode_acts[h.name], want.decode_acts[h.name], atol=1e-5, rtol=0)
    assert pools[1].timings["tail_steps"] > 0  # the last rows finished in the small pool
    assert 0 < pools[2].timings["narrow_prefill_calls"] < pools[2].timings["prefill_calls"]


def test_reused_slot_never_sees_the_previous_occupant(loaded_tiny):
    """Fill every cache column of the only slot with huge keys and values: a new prompt in that slot
    must give exactly what it gives in a fresh pool, so nothing stale is ever attended to."""
    lm = loaded_tiny
    hooks = hooks_of(lm)
    prompt = list(random_ids(90, 77))
    fresh = gen(lm, batch_size=1, decode_slots=1, prefill_hooks=hooks, decode_hooks=hooks).generate([prompt], [0])[0]
    g = gen(lm, batch_size=1, decode_slots=1, prefill_hooks=hooks, decode_hooks=hooks)
    g.generate([list(random_ids(600, 78))], [1])  # a long previous occupant
    k, v = g._state.cache
    poisoned = (jnp.full_like(k, 1e4), jnp.full_like(v, -1e4))
    g._state = dataclasses.replace(g._state, cache=poisoned)
    again = g.generate([prompt], [0])[0]
    np.testing.assert_array_equal(again.tokens, fresh.tokens)
    for h in hooks:
        np.testing.assert_array_equal(again.prefill_acts[h.name], fresh.prefill_acts[h.name])
        np.testing.assert_array_equal(again.decode_acts[h.name], fresh.decode_acts[h.name])


def test_greedy_equals_transformers_generate_with_per_row_eos(hf_tiny, loaded_tiny):
    model, _ = hf_tiny
    lm = loaded_tiny
    prompts = [list(random_ids(n, 20 + n)) for n in (50, 120, 33)]
    free = gen(lm, fixed_length=True).generate(prompts, [0, 1, 2])
    eos = int(free[0].tokens[12])  # row 0 stops at (or before) step 12; others may run to the end
    out = gen(lm, eos_ids=(eos,)).generate(prompts, [0, 1, 2])
    stopped = 0
    for prompt, done in zip(prompts, out):
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
        ours = done.tokens.tolist()
        assert ours == ref, f"sequence {done.sequence_id}"
        ref_lp = sum(torch.log_softmax(res.logits[t][0], -1)[tok].item() for t, tok in enumerate(ref))
        assert abs(done.logprob - ref_lp) < 1e-3
        if ours[-1] == eos:
            stopped += 1
            assert done.stop_reason == STOP_EOS
        else:
            assert len(ours) == 40 and done.stop_reason == STOP_LENGTH
    assert stopped >= 1 and len(out[0].tokens) <= 13


def test_stop_string_across_tokens(loaded_tiny):
    lm = loaded_tiny
    token_bytes = tuple(f"{i}|".encode() for i in range(lm.cfg.vocab_size))
    prompts = [list(random_ids(40, 5)), list(random_ids(90, 6))]
    g = gen(lm, fixed_length=True).generate(prompts, [0, 1])[0].tokens
    pattern = f"|{g[7]}|"  # spans the end of token 6 and all of token 7
    text = b""
    for t, tok in enumerate(g):
        text += token_bytes[tok]
        if pattern.encode() in text:
            expect = t + 1
            break
    cfg = GenerateConfig(batch_size=2, decode_slots=3, prefill_chunk=64, max_prompt_len=600, stop_strings=(pattern,))
    out = Generator(lm.cfg, lm.params, cfg, token_bytes=token_bytes).generate(prompts, [0, 1])[0]
    assert len(out.tokens) == expect <= 8
    assert out.stop_reason == STOP_STRING
    np.testing.assert_array_equal(out.tokens, g[:expect])


def test_sampling_is_seeded_per_sequence(loaded_tiny):
    lm = loaded_tiny
    prompts = [list(random_ids(30, 7)), list(random_ids(60, 8))]
    s = SamplingConfig(temperature=1.0, top_k=50, top_p=0.9)

    def tokens(outs):
        return [d.tokens.tolist() for d in outs]

    a = tokens(gen(lm, sampling=s, seed=1, fixed_length=True).generate(prompts, [0, 1]))
    assert a == tokens(gen(lm, sampling=s, seed=1, fixed_length=True).generate(prompts, [0, 1]))
    assert a != tokens(gen(lm, sampling=s, seed=2, fixed_length=True).generate(prompts, [0, 1]))
    # A sequence samples the same tokens whatever slot it lands in.
    swapped = gen(lm, sampling=s, seed=1, fixed_length=True).generate(prompts[::-1], [1, 0])
    assert tokens(swapped)[::-1] == a
    greedy = tokens(gen(lm, fixed_length=True).generate(prompts, [0, 1]))
    for special in (SamplingConfig(temperature=0.7, top_k=1), SamplingConfig(temperature=1e-6)):
        assert tokens(gen(lm, sampling=special, seed=3, fixed_length=True).generate(prompts, [0, 1])) == greedy


def test_one_compile_serves_every_prompt_length(loaded_tiny):
    lm = loaded_tiny
    hooks = hooks_of(lm)
    g = gen(lm, prefill_hooks=hooks, decode_hooks=hooks, max_new_tokens=8)
    g.generate([list(random_ids(100, 1)), list(random_ids(120, 2))], [0, 1])
    before = CompileCounter.count
    g.generate([list(random_ids(101, 3))], [2])
    g.generate([list(random_ids(n, n)) for n in (1, 65, 70, 128, 99, 300, 599, 600, 2)], list(range(3, 12)))
    assert CompileCounter.count == before


def test_rejects_bad_prompts_and_configs(loaded_tiny):
    g = gen(loaded_tiny)
    with pytest.raises(ValueError, match="sequence 0: prompt of 601 tokens exceeds max_prompt_len=600"):
        g.generate([[1] * 601], [0])
    with pytest.raises(ValueError, match="sequence 3: empty prompt"):
        g.generate([[]], [3])
    with pytest.raises(ValueError, match="unique"):
        g.generate([[1], [2]], [4, 4])
    with pytest.raises(FieldError, match="power of two"):
        GenerateConfig(prefill_chunk=100)
    with pytest.raises(FieldError, match="below batch_size"):
        GenerateConfig(batch_size=8, decode_slots=4)
    with pytest.raises(FieldError, match=r"tail_slots: 4 is impossible; it must be in \[0, decode_slots=4\)"):
        GenerateConfig(batch_size=2, decode_slots=4, tail_slots=4)
    with pytest.raises(FieldError, match=r"narrow_lanes: 5 is impossible; it must be in \[0, batch_size / 2 = 4\]"):
        GenerateConfig(batch_size=8, narrow_lanes=5)


def test_acts_reach_the_host_in_acts_dtype_and_float16_overflow_is_refused(loaded_tiny):
    """acts_dtype: each prompt chunk is cast as it lands and each answer as it is read, so the host
    keeps the storage dtype's bytes; the values are the model's cast, bit for bit. Values past
    float16's range are refused, never kept as inf."""
    lm = loaded_tiny
    hooks = hooks_of(lm)
    prompts = [list(random_ids(n, 40 + n)) for n in (300, 7, 129)]
    kw = dict(prefill_hooks=hooks, decode_hooks=hooks, max_new_tokens=6, fixed_length=True)
    wide = gen(lm, **kw).generate(prompts, [0, 1, 2])
    for name in ("float16", "bfloat16"):
        narrow = gen(lm, acts_dtype=name, **kw).generate(prompts, [0, 1, 2])
        for a, b in zip(wide, narrow):
            np.testing.assert_array_equal(b.tokens, a.tokens)
            for h in hooks:
                for got, want in ((b.prefill_acts[h.name], a.prefill_acts[h.name]),
                                  (b.decode_acts[h.name], a.decode_acts[h.name])):  # fmt: skip
                    assert got.dtype == float_dtype(name) and want.dtype == np.float32
                    np.testing.assert_array_equal(got.view(np.uint16), want.astype(got.dtype).view(np.uint16))
    loud = {**lm.params, "embed": lm.params["embed"] * 1e8}  # the residual stream carries the embedding
    cfg = GenerateConfig(batch_size=2, decode_slots=2, prefill_chunk=64, max_prompt_len=600, **kw)
    assert Generator(lm.cfg, loud, dataclasses.replace(cfg, acts_dtype="bfloat16")).generate(prompts[1:2], [0])
    with pytest.raises(FloatOverflowError, match=r"activations up to \d+ overflow float16; use capture.dtype"):
        Generator(lm.cfg, loud, dataclasses.replace(cfg, acts_dtype="float16")).generate(prompts[1:2], [0])
    with pytest.raises(FieldError, match="acts_dtype: 'int8' is not one of bfloat16, float16, float32"):
        GenerateConfig(acts_dtype="int8")


def test_a_finished_sequence_is_freed_once_the_consumer_drops_it(loaded_tiny):
    """The engine keeps nothing of a sequence it has handed over, not even while it prefills the next
    prompts: a round's list of new prompts once kept a whole wave of them, activations and all, alive
    until the next round (a wave of short answers finishing together: twice the pool's prompts)."""
    lm = loaded_tiny
    hooks = hooks_of(lm)
    prompts = [list(random_ids(n, 60 + n)) for n in (130, 70, 90, 100, 80, 120, 65)]
    for new in (2, 0):  # all rows of a wave stop together; prefill only
        g = gen(lm, prefill_hooks=hooks, max_new_tokens=new, fixed_length=True, batch_size=2, decode_slots=2)
        handed = []
        for done in g.stream(enumerate(prompts)):
            handed.append(weakref.ref(done.prefill_acts[hooks[0].name]))
            del done
            # the one just handed over may still be the engine's loop variable; none before it may live
            assert [r() is None for r in handed[:-1]] == [True] * (len(handed) - 1), (new, len(handed))
        assert len(handed) == len(prompts)


def test_prefill_only_stops_at_the_deepest_hook_and_equals_a_full_run(loaded_tiny):
    """max_new_tokens=0: no decode, no LM head, layers up to the deepest hook only; the prompt
    activations equal those of a run that generates (and of the full forward pass)."""
    lm = loaded_tiny
    hooks = parse_hooks(["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"], lm.cfg)  # of 3 layers
    prompts = [list(random_ids(n, 20 + n)) for n in (300, 5, 129, 64, 200)]
    ids = [4, 0, 3, 1, 2]
    full = gen(lm, prefill_hooks=hooks, max_new_tokens=3).generate(prompts, ids)
    only = gen(lm, prefill_hooks=hooks, max_new_tokens=0)
    assert only.cfg.n_layers == 2 and only.params["stacked"]["q_w"].shape[0] == 2  # layer 2 is never run
    assert only.params["layers"] == ()  # nothing decodes: the scanned stack is the only copy of the layers
    outs = only.generate(prompts, ids)
    before = CompileCounter.count
    assert [d.sequence_id for d in only.generate(prompts[::-1], ids[::-1])] == ids[::-1]
    assert CompileCounter.count == before  # one prefill program serves every prompt length
    for prompt, a, b in zip(prompts, full, outs):
        assert b.sequence_id == a.sequence_id and b.prompt_length == len(prompt) and len(b.tokens) == 0
        assert b.decode_acts == {} and only.timings["decode_steps"] == 0
        for h in hooks:
            np.testing.assert_allclose(b.prefill_acts[h.name], a.prefill_acts[h.name], atol=1e-6, rtol=0)
    x, acts = forward(lm.cfg, lm.params, jnp.asarray(np.array(prompts[0], np.int32)[None]), hooks=hooks)
    np.testing.assert_allclose(outs[0].prefill_acts[hooks[1].name], np.asarray(acts[hooks[1].name])[0], atol=ATOL)
    with pytest.raises(FieldError, match="generates no answer to capture"):
        GenerateConfig(max_new_tokens=0, decode_hooks=hooks)


def _affine(p, x):  # an edit with parameters: the spliced model's shape (an SAE is one such fn)
    return x * p["scale"] + p["shift"]


def test_edited_hook_decodes_like_the_edited_full_forward(loaded_tiny):
    """An Edit replaces blocks.1.hook_resid_post in prefill (scanned layers) and decode (unrolled):
    cached decode still equals the full forward pass under the same edit, the edit changes the
    result, and new edit parameters reuse the compiled programs."""
    from harvest.engine.hooks import Edit, HookError

    lm = loaded_tiny
    hooks = hooks_of(lm)
    edit = Edit(parse_hooks("blocks.1.hook_resid_post", lm.cfg)[0], _affine)
    p = {"scale": jnp.float32(0.5), "shift": jnp.full((lm.cfg.d_model,), 0.25, jnp.float32)}
    prompts = [list(random_ids(200, 5)), list(random_ids(9, 6))]
    kw = dict(fixed_length=True, max_new_tokens=12, prefill_hooks=hooks, decode_hooks=hooks, edit=edit)
    g = Generator(lm.cfg, lm.params, GenerateConfig(**{**dict(batch_size=2, decode_slots=2, prefill_chunk=64,
                  max_prompt_len=256), **kw}), edit_params=p)  # fmt: skip
    outs = g.generate(prompts, [0, 1])
    plain = gen(lm, **{**kw, "edit": None}).generate(prompts, [0, 1])
    assert any(not np.array_equal(a.tokens, b.tokens) for a, b in zip(outs, plain))
    for prompt, done in zip(prompts, outs):
        assert_matches_full_forward(lm, hooks, prompt, done, edit=edit, edit_params=p)
    identity = {"scale": jnp.float32(1.0), "shift": jnp.zeros((lm.cfg.d_model,), jnp.float32)}
    before = CompileCounter.count
    same = Generator(lm.cfg, lm.params, g.gcfg, edit_params=identity).generate(prompts, [0, 1])
    assert CompileCounter.count == before  # edit parameters are arguments, not constants
    for a, b in zip(same, plain):  # the identity edit changes nothing
        np.testing.assert_array_equal(a.tokens, b.tokens)
    with pytest.raises(HookError, match="cannot be edited"):
        Edit(parse_hooks("blocks.0.mlp.hook_post", lm.cfg)[0], _affine)
