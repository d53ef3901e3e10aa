"""harvest vs transformers on the same harvesting work, side by side in one run.

    python bench/generate.py [--model DIR|random:0.5b] [--dtype float32|bfloat16] [--prompts 8]
                             [--batch 4] [--max-prompt 1024] [--new 32] [--hooks 3]

Both sides run the same ARC-AGI-1 evaluation prompts (base format, longest first), in batches,
greedy with exactly --new new tokens per row (fixed_length), and capture the same residual-stream
hooks from prefill and decode to host memory. transformers captures through forward hooks that
copy each layer output to the host, as users do today. harvest is timed after one untimed
warm-up pass that compiles every bucket; its compile time is printed separately.

Printed: tokens/s for each (prompt + generated tokens over wall time), the ratio, and achieved
GFLOP/s (2 x non-embedding params x tokens) against a float32 / bfloat16 matmul peak measured here.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from harvest import arc
from harvest.engine.generate import GenerateConfig, Generator
from harvest.engine.hooks import parse_hooks
from harvest.weights.checkpoint import load_model

REAL = os.path.expanduser("~/.cache/harvest-fixtures/qwen2.5-coder-0.5b-instruct")


def matmul_peak(dtype, n=2048, reps=5) -> float:
    """GFLOP/s of an n x n matmul in XLA, accumulating in float32."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.einsum("ij,jk->ik", x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        f(a, a).block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def arc_prompts(tokenizer, count: int, max_len: int) -> list[list[int]]:
    tasks, _ = arc.load_tasks("arc-agi-1", "evaluation")
    pb = arc.PromptBuilder(tokenizer, arc.PromptConfig(chat=False))
    ids = [pb.build(s).token_ids.tolist() for s in arc.make_sequences(tasks)]
    ids = [p for p in ids if len(p) <= max_len][:count]
    return sorted(ids, key=len, reverse=True)


def run_harvest(lm, prompts, batch, new, hooks):
    g = Generator(
        lm.cfg,
        lm.params,
        GenerateConfig(
            batch_size=batch, max_new_tokens=new, fixed_length=True, prefill_hooks=hooks, decode_hooks=hooks
        ),
        eos_ids=lm.eos_ids,
    )

    def once():
        pending = []
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            pending.append(g.generate(chunk, list(range(i, i + len(chunk)))))
        return [p.to_host() for p in pending]

    t = time.perf_counter()
    once()
    compile_and_run = time.perf_counter() - t
    t = time.perf_counter()
    outs = once()
    return time.perf_counter() - t, compile_and_run, sum(int(o.num_generated.sum()) for o in outs)


def run_transformers(folder_or_none, lm, prompts, batch, new, hook_layers, dtype):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if folder_or_none:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder_or_none, dtype=tdtype).eval()
    else:  # same shape, random weights: speed does not depend on the values
        model = (
            transformers.Qwen2ForCausalLM(
                transformers.Qwen2Config(**{k: v for k, v in lm.hf_config.items() if k not in ("architectures",)})
            )
            .to(tdtype)
            .eval()
        )
    captured = []
    handles = [
        model.model.layers[i].register_forward_hook(
            lambda m, a, out: captured.append(out[0].detach().to("cpu", copy=True))
        )
        for i in hook_layers
    ]
    pad = lm.eos_ids[0]
    generated = 0
    t = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])  # left padding, as generate wants
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=pad
            )
        generated += (out.shape[1] - width) * len(chunk)
        captured.clear()
    elapsed = time.perf_counter() - t
    for h in handles:
        h.remove()
    return elapsed, generated


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=REAL if os.path.isdir(REAL) else "random:0.5b")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--hooks", type=int, default=3, help="residual-stream hooks, spread over the layers")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()

    lm = load_model(args.model, args.dtype)
    n_layers = lm.cfg.n_layers
    layers = sorted({round(i * (n_layers - 1) / max(args.hooks - 1, 1)) for i in range(args.hooks)})
    hooks = parse_hooks([f"blocks.{i}.hook_resid_post" for i in layers], lm.cfg)
    prompts = arc_prompts(lm.tokenizer, args.prompts, args.max_prompt)
    prompt_tokens = sum(map(len, prompts))
    non_embed = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(lm.params["layers"]))
    peak = matmul_peak(jnp.float32 if args.dtype == "float32" else jnp.bfloat16)
    print(
        f"model {args.model} ({n_layers} layers, d={lm.cfg.d_model}, {non_embed / 1e6:.0f}M non-embedding params), "
        f"{args.dtype}, device {jax.devices()[0].device_kind}"
    )
    print(
        f"work: {len(prompts)} ARC-AGI-1 prompts ({prompt_tokens} tokens, max {len(prompts[0])}), batch {args.batch}, "
        f"{args.new} new tokens each, hooks {[h.name for h in hooks]} in prefill and decode"
    )
    print(f"matmul peak ({args.dtype}, f32 accumulation): {peak:.0f} GFLOP/s")

    rows = []
    secs, first, gen = run_harvest(lm, prompts, args.batch, args.new, hooks)
    rows.append(("harvest (JAX)", secs, gen, f"first pass incl. compile {first:.1f} s"))
    if not args.skip_transformers:
        folder = None if args.model.startswith("random:") else (str(lm.folder) if lm.folder else None)
        secs_t, gen_t = run_transformers(folder, lm, prompts, args.batch, args.new, layers, args.dtype)
        rows.append(("transformers", secs_t, gen_t, "eager PyTorch, forward hooks"))
    print(f"\n{'':16}{'seconds':>9}{'tok/s':>9}{'GFLOP/s':>9}{'% peak':>8}  note")
    for name, secs, gen, note in rows:
        tokens = prompt_tokens + gen
        gflops = 2 * non_embed * tokens / secs / 1e9
        print(f"{name:16}{secs:9.1f}{tokens / secs:9.1f}{gflops:9.0f}{100 * gflops / peak:7.0f}%  {note}")
    if len(rows) == 2:
        print(
            "\nharvest / transformers throughput: "
            f"{rows[1][1] / rows[0][1] * (prompt_tokens + rows[0][2]) / (prompt_tokens + rows[1][2]):.2f}x"
        )


if __name__ == "__main__":
    main()
