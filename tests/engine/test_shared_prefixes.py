"""Shared prompt prefixes: a prompt that starts like one in flight copies its cache instead of
recomputing it, and every sequence still equals the same prompt run without sharing."""

import weakref

import numpy as np

from harvest.engine.generate import GenerateConfig, Generator
from harvest.engine.hooks import parse_hooks
from harvest.engine.sampling import SamplingConfig
from helpers.models import random_ids

CHUNK = 64
A = list(random_ids(300, 5))
PROMPTS = {
    0: A,
    1: A,  # samples of one prompt: no prefill at all
    2: A,
    3: A[:200] + list(random_ids(100, 6)),  # shares 200 tokens: 3 whole chunks copied
    4: A[:150] + list(random_ids(40, 7)),  # 2 chunks
    5: A[:40] + list(random_ids(90, 8)),  # less than a chunk: prefilled alone
    6: A[:100],  # a prefix of A: one chunk copied, its last token is computed
}
# tokens copied when all seven are admitted at once: 300 + 300 + 192 + 128 + 0 + 64
SHARED = 984


def gen(lm, share, **kw):
    hooks = parse_hooks([f"blocks.{lm.cfg.n_layers - 1}.hook_resid_post", "blocks.0.mlp.hook_post"], lm.cfg)
    base = dict(batch_size=2, decode_slots=8, prefill_chunk=CHUNK, max_prompt_len=320, max_new_tokens=24)
    base |= dict(prefill_hooks=hooks, decode_hooks=hooks, share_prefixes=share, seed=3)
    base |= dict(sampling=SamplingConfig(temperature=2.0))  # samples of one prompt must differ
    eos = kw.pop("eos_ids", (7,))
    base |= kw
    if base["max_new_tokens"] == 0:
        base["decode_hooks"] = ()
    return Generator(lm.cfg, lm.params, GenerateConfig(**base), eos_ids=eos)


def assert_same_sequences(got, want):
    for a, b in zip(got, want):
        assert a.sequence_id == b.sequence_id and a.prompt_length == b.prompt_length
        np.testing.assert_array_equal(a.tokens, b.tokens)
        assert a.stop_reason == b.stop_reason
        np.testing.assert_allclose(a.logprob, b.logprob, rtol=1e-5)
        assert a.prefill_acts.keys() == b.prefill_acts.keys() and a.decode_acts.keys() == b.decode_acts.keys()
        for k in a.prefill_acts:
            assert a.prefill_acts[k].shape == b.prefill_acts[k].shape
            np.testing.assert_allclose(a.prefill_acts[k], b.prefill_acts[k], atol=1e-5, rtol=0, err_msg=k)
        for k in a.decode_acts:
            np.testing.assert_allclose(a.decode_acts[k], b.decode_acts[k], atol=1e-5, rtol=0, err_msg=k)


def test_sharing_changes_no_sequence_and_skips_the_shared_prefill(loaded_tiny):
    lm = loaded_tiny
    ids, prompts = list(PROMPTS), list(PROMPTS.values())
    plain = gen(lm, share=False)
    want = plain.generate(prompts, ids)
    assert plain.timings["shared_prompt_tokens"] == 0
    assert len({tuple(want[i].tokens) for i in (0, 1, 2)}) == 3, "samples of one prompt must differ"
    shared = gen(lm, share=True)
    assert_same_sequences(shared.generate(prompts, ids), want)
    assert shared.timings["shared_prompt_tokens"] == SHARED
    assert shared.timings["prefill_calls"] < plain.timings["prefill_calls"]
    # Other pools and orders: donors that are already decoding (a copy arms from their kept prompt-end
    # logits, a partial share copies whole chunks), or that finished and left, or lanes still carrying them.
    for kw in (dict(decode_slots=3, tail_slots=1, segment_steps=4), dict(batch_size=1, decode_slots=2)):
        for order in (ids[::-1], [3, 0, 6, 1, 5, 2, 4]):
            g = gen(lm, share=True, **kw)
            got = {d.sequence_id: d for d in g.generate([PROMPTS[i] for i in order], order)}
            assert_same_sequences([got[i] for i in ids], want)


def test_prefill_only_runs_share_too(loaded_tiny):
    lm = loaded_tiny
    ids, prompts = list(PROMPTS), list(PROMPTS.values())
    want = gen(lm, share=False, max_new_tokens=0).generate(prompts, ids)
    shared = gen(lm, share=True, max_new_tokens=0)
    assert_same_sequences(shared.generate(prompts, ids), want)
    assert shared.timings["shared_prompt_tokens"] > 0


def test_a_copy_admitted_while_its_donor_decodes_is_never_prefilled(loaded_tiny):
    """Four samples of one prompt through two slots: the first is prefilled; each later one enters the
    slot a finished row frees and is armed from a decoding copy's kept prompt-end logits (no prefill
    call, no recomputed last chunk), and every sequence equals its run without sharing."""
    lm = loaded_tiny
    ids, prompts = [0, 1, 2, 3], [A] * 4
    kw = dict(batch_size=1, decode_slots=2, tail_slots=0)
    free = {d.sequence_id: d.tokens for d in gen(lm, share=False, eos_ids=(), **kw).generate(prompts, ids)}
    # EOS: the earliest tokens of rows 0 and 2 that row 1 never samples. Rows 0 and 2 stop early while
    # row 1 decodes all 24 tokens, so each later sample is admitted while a copy of its prompt decodes.
    eos = tuple(int(next(x for x in free[i] if x not in free[1])) for i in (0, 2))
    first = {i: next((t for t, x in enumerate(free[i]) if x in eos), None) for i in ids}
    assert first[1] is None and first[0] + first[2] + 2 < 24, first
    want = gen(lm, share=False, eos_ids=eos, **kw).generate(prompts, ids)
    shared = gen(lm, share=True, eos_ids=eos, **kw)
    assert_same_sequences(shared.generate(prompts, ids), want)
    assert shared.timings["prefill_calls"] == -(-len(A) // CHUNK)  # the first sample's chunks only
    assert shared.timings["shared_prompt_tokens"] == 3 * len(A)


def test_a_handed_over_donor_is_freed_while_a_prompt_it_lent_to_is_in_flight(loaded_tiny):
    """A partly shared prompt copies its donor's rows into its own arrays once they have landed (the end
    of the round that forked it), so the donor's activations go when the donor is handed over, not when
    the last prompt that borrowed from it does."""
    lm = loaded_tiny
    prompts = {0: A, 1: A[:200] + list(random_ids(300, 9)), 2: list(random_ids(70, 10))}  # 1 outlives 0
    kw = dict(max_new_tokens=0, max_prompt_len=600)
    want = {d.sequence_id: d for d in gen(lm, share=False, **kw).generate(list(prompts.values()), list(prompts))}
    g = gen(lm, share=True, **kw)
    handed = []
    for done in g.stream(prompts.items()):
        assert_same_sequences([done], [want[done.sequence_id]])
        handed.append((done.sequence_id, weakref.ref(next(iter(done.prefill_acts.values())))))
        del done
        assert [i for i, r in handed[:-1] if r() is not None] == [], handed
    assert [i for i, _ in handed] == [0, 2, 1] and g.timings["shared_prompt_tokens"] == 192
