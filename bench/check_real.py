"""Parity of harvest against transformers on a real checkpoint (not a CI test: needs the weights).

    python bench/check_real.py [FOLDER] [--tokens 600] [--new 32]

Runs one ARC prompt of 500+ tokens in float32 through both, and prints the max abs difference of
the last-token logits and of every layer's residual stream, then greedy-decodes through both and
prints whether the tokens agree. FOLDER defaults to what ../shared/tools/real-qwen-checkpoint builds.
"""

import argparse
import os
import time

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from harvest import arc
from harvest.engine.generate import GenerateConfig, Generator
from harvest.engine.hooks import parse_hooks
from harvest.engine.model import logits as lm_logits
from harvest.engine.prefill import forward
from harvest.weights.checkpoint import load_model

DEFAULT = os.path.expanduser("~/.cache/harvest-fixtures/qwen2.5-coder-0.5b-instruct")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default=DEFAULT)
    ap.add_argument("--tokens", type=int, default=600, help="minimum prompt length")
    ap.add_argument("--new", type=int, default=32, help="greedy tokens to compare")
    args = ap.parse_args()
    lm = load_model(args.folder, "float32")
    tok = lm.tokenizer
    tasks, _ = arc.load_tasks("arc-agi-1", "evaluation")
    pb = arc.PromptBuilder(tok, arc.PromptConfig(), instruct=True)
    prompt = next(p for s in arc.make_sequences(tasks) if len(p := pb.build(s)) >= args.tokens)
    ids = prompt.token_ids
    n = len(ids)
    print(f"prompt: {n} tokens (chat template), model {args.folder}")
    ref = transformers.AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref(torch.tensor(ids[None], dtype=torch.long), output_hidden_states=True)
    hooks = parse_hooks("blocks.*.hook_resid_post", lm.cfg)
    x, _ = forward(lm.cfg, lm.params, jnp.asarray(ids[None]))
    logits = lm_logits(lm.cfg, lm.params, x[0, -1])
    # The activations come from the chunked prefill the pipeline runs (chunks of 256 reading the cache).
    gcfg = GenerateConfig(1, 1, 256, max_prompt_len=n, max_new_tokens=1, prefill_hooks=hooks)
    acts = {k: a[None] for k, a in Generator(lm.cfg, lm.params, gcfg).generate([ids], [0])[0].prefill_acts.items()}
    d_logits = np.abs(np.asarray(logits) - out.logits[0, -1].numpy()).max()
    d_hidden, rel = [], []
    for h in hooks[:-1]:
        r = out.hidden_states[h.layer + 1][0].numpy()
        d = np.abs(np.asarray(acts[h.name])[0, :n] - r)
        d_hidden.append(d.max())
        # Qwen2's residual stream has "massive activations" (|x| ~ 1e3-1e4 in a few dimensions at
        # the first token), where float32 itself only resolves ~1e-4; so report the error relative
        # to each token's own residual norm as well.
        rel.append((d.max(-1) / np.abs(r).max(-1)).max())
    print(f"max |logits diff| {d_logits:.2e}   (logit scale {np.abs(out.logits[0, -1].numpy()).max():.1f})")
    print(f"max |resid_post diff| per layer: {' '.join(f'{d:.1e}' for d in d_hidden)}")
    print(
        "max |resid_post| per layer: "
        + " ".join(f"{np.abs(out.hidden_states[h.layer + 1][0].numpy()).max():.0f}" for h in hooks[:-1])
    )
    print(f"max diff relative to the token's max |resid|: {max(rel):.1e}")
    print(
        f"logits within 1e-4: {'PASS' if d_logits < 1e-4 else 'FAIL'}; worst absolute residual diff {max(d_hidden):.2e}"
    )
    gcfg = GenerateConfig(batch_size=1, decode_slots=1, max_prompt_len=n, max_new_tokens=args.new)
    g = Generator(lm.cfg, lm.params, gcfg, eos_ids=lm.eos_ids)
    t0 = time.perf_counter()
    ours = g.generate([list(ids)], [0])[0].tokens.tolist()
    t1 = time.perf_counter()
    with torch.no_grad():
        theirs = ref.generate(
            torch.tensor(ids[None], dtype=torch.long),
            do_sample=False,
            max_new_tokens=args.new,
            eos_token_id=list(lm.eos_ids),
            pad_token_id=lm.eos_ids[0],
        )[0, n:].tolist()
    t2 = time.perf_counter()
    print(
        f"greedy {len(ours)} tokens: {'IDENTICAL' if ours == theirs else 'DIFFERENT'} "
        f"(harvest {t1 - t0:.1f}s incl. compile, transformers {t2 - t1:.1f}s)"
    )
    print("answer:", repr(tok.decode(ours)))


if __name__ == "__main__":
    main()
