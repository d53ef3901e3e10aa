"""harvest vs transformers, whole process against whole process, on the same harvesting work.

    python bench/harvest_vs_hf.py [--workload answers|prompts|samples|prefill-only|rss] [--model DIR]
                                  [--dtype float32|bfloat16]
                                  [--tasks N] [--batch 8] [--harvest-set section.key=value ...]
                                  [--rss-tasks 50,100,400] [--json PATH] [--keep] [--quick]
    python bench/harvest_vs_hf.py --quick            # smoke test: tiny random Qwen2 + real tokenizer, < 2 min

Each side is its own child process, timed around the whole process (wall seconds), with its own peak
RSS from os.wait4 (both are forked by a small spawner process: Linux charges a forking process's RSS
to the child's ru_maxrss, and this parent holds JAX and torch). harvest is
`python -m harvest.run CFG --overwrite [--set ...]`; transformers is this file re-invoked as
`--side hf SPEC.json`: AutoModelForCausalLM + generate(output_hidden_states=True), left padding,
batches of --batch prompts sorted longest first.

Workloads (ARC-AGI-1 evaluation, tasks in id order, kept only if every test prompt is <= 1024 tokens;
every test input is one sequence; harvest gets the chosen ids as data.tasks):
  answers  (default, 48 tasks) chat prompts, greedy, each row stops at its own EOS (151645, 151643 and
           the checkpoint's eos ids), <= 300 new tokens. Stop rule: EOS only on both sides. For chat
           prompts harvest's `auto` stop strings are empty anyway (PromptBuilder.stop_strings), so
           `generation.stop_strings: []` is harvest's default behaviour, and transformers needs no
           tokenizer-level stop strings.
  prompts  (16 tasks) base prompts, exactly 32 new tokens (harvest fixed_length; transformers
           min_new_tokens = max_new_tokens, which masks EOS: same token counts, other tokens).
  samples  (16 tasks) chat prompts, 8 samples each at temperature 0.7 (top-k and top-p off on both sides),
           <= 300 new tokens, each row stops at its own EOS. harvest: generation.samples 8 (one prompt,
           prefilled once, its rows stored once: capture.min_shared_prefix); transformers:
           generate(num_return_sequences=8, do_sample=True), one prompt (8 rows) per call, saving every row.
           Also printed: the rows each side stores against the rows of every copy.
  prefill-only  (48 tasks) base prompts, no generation, blocks.{n/4}.hook_resid_post only (6 of 24 layers).
           harvest: generation.max_new_tokens 0, capture.phases [prefill] (it stops after layer n/4 and runs
           no LM head); transformers: one forward pass per batch with output_hidden_states=True.
  rss      harvest only: peak RSS of random:0.5b runs (--rss-model; random:tiny with --quick), 8 forced new tokens,
           data.limit = each of --rss-tasks, data.max_prompt_tokens 1024; then one long prompt: the ARC-AGI-2
           training task whose base prompt is the longest within --rss-long tokens (9,216).
Hooks: blocks.{n/4, n/2, 3n/4}.hook_resid_post (6/12/18 for 24 layers), float16, every prompt token
and every generated token up to and including the stop token. transformers' hidden_states[L + 1] is
resid_post of layer L; the final token of rows still running at the last step was never fed to the
model by generate, so the transformers side runs one more forward pass (as harvest's decode loop does).
Saved bytes: transformers compresses each sequence's [tokens, d_model] float16 arrays in harvest's
chunk rows with harvest's codec settings (blosc zstd, level and block size from harvest.store.shard)
and writes + fsyncs one file per sequence; harvest writes its Zarr shards.

Printed per side: seconds (wall, whole process), in-process seconds (harvest: summary.json
session.seconds; transformers: the batch loop incl. writing), prefill / decode / compile seconds,
prefill GFLOP/s = 2 x non-embedding params x prompt tokens / prefill s (attention FLOPs and padding
not counted) against an XLA CPU matmul peak (the higher of a 2048 square and the model's own prefill
matmul shapes, 8 x 128 tokens; each the best of 3 rounds, measured before and after both sides, the
higher kept), decode tok/s = generated tokens / decode s, and decode
GB/s = weight bytes (non-embedding + LM head) x decode steps / decode s (KV reads not counted)
against a jitted-sum read bandwidth. harvest's numbers come from summary.json "session": seconds,
prompt_tokens, generated_tokens, tokens_per_second, and when present compile_seconds,
prefill_seconds, decode_seconds, decode_steps (loop iterations, each reading every weight once);
absent ones print n/a. The transformers side has no compile; its prefill ends at the first new token.
Also printed: harvest's mean live rows per decode step (generated tokens / decode_steps), the pool's
occupancy, which the scheduler sets (decode_slots is the most it can be).
Run it on a quiet machine: with other jobs on the cores, torch's spinning threads slow down many-fold.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL = os.path.expanduser("~/.cache/harvest-fixtures/qwen2.5-coder-0.5b-instruct")
TOKENIZER = ROOT / "harvest" / "assets" / "qwen2_tokenizer"
QWEN2_EOS = (151645, 151643)
MAX_PROMPT = 1024
SAMPLES, TEMPERATURE = 8, 0.7  # the samples workload
PRESET_LAYERS = {"tiny": 4, "small": 8, "0.5b": 24, "1.5b": 28}  # harvest.engine.config.PRESETS


def fail(msg: str):
    raise SystemExit(f"harvest_vs_hf: error: {msg}")


def hook_layers(n: int) -> list[int]:
    return sorted({min(n * k // 4, n - 2) for k in (1, 2, 3)})  # n - 2: hidden_states[n] is after the final norm


# ------------------------------------------------------------------------------ transformers side


def hf_side(spec_path: str) -> None:
    """Child process: transformers generate over the spec's prompts; writes the result JSON."""
    import numcodecs
    import numpy as np
    import torch
    import transformers

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(os.cpu_count())
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"]))
    model.eval()
    c = spec["codec"]
    codec = numcodecs.Blosc(c["cname"], c["level"], numcodecs.Blosc.SHUFFLE, c["blocksize"])
    eos, pad, layers, new, fixed = spec["eos_ids"], spec["pad_id"], spec["layers"], spec["max_new"], spec["fixed"]
    samples = spec.get("samples", 1)
    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x renamed

    gen_kw = dict(
        do_sample=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=new, min_new_tokens=new if fixed else 0,
        eos_token_id=eos, pad_token_id=pad, output_hidden_states=True, return_dict_in_generate=True,
    )  # fmt: skip
    if samples > 1:  # harvest's sampling: plain temperature, no top-k (transformers' default is 50), no top-p
        gen_kw.update(do_sample=True, temperature=spec["temperature"], top_k=0, top_p=1.0)
        gen_kw.update(num_return_sequences=samples)

    class FirstToken(transformers.generation.streamers.BaseStreamer):
        """generate calls put(prompt ids) before prefill, then put(token) after each step."""

        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self):
            pass

    r = dict(prompt_tokens=0, generated_tokens=0, stored_tokens=0, bytes=0, decode_steps=0)
    r.update(prefill_seconds=0.0, decode_seconds=0.0, lengths={})
    seqs, batch, t0 = spec["sequences"], spec["batch"], time.perf_counter()
    for start in range(0, len(seqs), batch):
        chunk = seqs[start : start + batch]
        width = max(len(s["ids"]) for s in chunk)
        ids = torch.tensor([[pad] * (width - len(s["ids"])) + s["ids"] for s in chunk])
        mask = torch.tensor([[0] * (width - len(s["ids"])) + [1] * len(s["ids"]) for s in chunk])
        timer, t = FirstToken(), time.perf_counter()
        if new == 0:  # prefill only: one forward pass, the prompt's hidden states
            with torch.inference_mode():
                hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
                acts, lengths, steps = [hidden[L + 1].to(torch.float16) for L in layers], [0] * len(chunk), 0
            timer.first = done = time.perf_counter()
        else:
            acts, lengths, steps, done = generate_batch(model, ids, mask, timer, gen_kw, eos, fixed, layers, cache_kw)
        r["prefill_seconds"] += timer.first - t
        r["decode_seconds"] += done - timer.first
        r["decode_steps"] += steps
        for b, n_gen in enumerate(lengths):  # rows: each prompt's samples in turn
            s = chunk[b // samples]
            n = len(s["ids"])
            for key, add in (("prompt_tokens", n), ("generated_tokens", n_gen), ("stored_tokens", n + n_gen)):
                r[key] += add
            r["lengths"][s["key"] if samples == 1 else f"{s['key']}/{b % samples}"] = n_gen
            with open(out_dir / f"{start * samples + b:06d}.bin", "wb") as f:
                for a in acts:
                    rows = np.ascontiguousarray(a[b, width - n : width + n_gen].numpy())
                    for i in range(0, len(rows), spec["chunk_rows"]):
                        enc = codec.encode(rows[i : i + spec["chunk_rows"]])
                        f.write(enc)
                        r["bytes"] += len(enc)
                f.flush()
                os.fsync(f.fileno())
        del acts
    r["seconds"] = time.perf_counter() - t0
    Path(spec["result"]).write_text(json.dumps(r))


def generate_batch(model, ids, mask, timer, gen_kw, eos, fixed, layers, cache_kw):
    """transformers generate on one batch -> (acts per layer [B, width + run tokens, d] float16, generated
    lengths, decode steps, end time)."""
    import torch

    width = ids.shape[1]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, streamer=timer, **gen_kw)
        gen = out.sequences[:, width:]
        steps = gen.shape[1]
        lengths = []
        for row in gen.tolist():
            hit = [j for j, tok in enumerate(row) if tok in eos]
            lengths.append(steps if fixed or not hit else hit[0] + 1)
        extra = None
        if max(lengths) == steps:  # that last token was never run through the model: run it
            mask = mask.repeat_interleave(len(gen) // len(ids), 0)  # num_return_sequences rows per prompt
            full = torch.cat([mask, torch.ones(len(gen), steps, dtype=mask.dtype)], 1)
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            extra = model(
                input_ids=gen[:, -1:], attention_mask=full, position_ids=full.sum(1, keepdim=True) - 1,
                use_cache=True, output_hidden_states=True, logits_to_keep=1, **{cache_kw: cache},
            ).hidden_states  # fmt: skip
        done = time.perf_counter()
        # hidden_states[0]: prefill [B, width, d] per layer; [s >= 1]: generated token s - 1 fed in, [B, 1, d]
        acts = [
            torch.cat([out.hidden_states[s][L + 1] for s in range(steps)] + ([extra[L + 1]] if extra else []), 1).to(
                torch.float16
            )
            for L in layers
        ]
    return acts, lengths, steps - 1 + (extra is not None), done


# ---------------------------------------------------------------------------------- parent side


def matmul_peak(dtype, n=2048, reps=5, rounds=3, shapes=None) -> float:
    """GFLOP/s of XLA matmuls, accumulating in float32 (bench/generate.py): the best of `rounds` rounds of
    `reps` calls for each (m, k, n) shape (default one n x n square), then the best shape. A peak is what the
    machine can do; one short round on this shared machine has read as low as 117 against 180 the same day."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x, y: jnp.einsum("ij,jk->ik", x, y, preferred_element_type=jnp.float32))
    best = 0.0
    for m, k, n_out in shapes or [(n, n, n)]:
        a, b = jnp.ones((m, k), dtype), jnp.ones((k, n_out), dtype)
        f(a, b).block_until_ready()
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(reps):
                f(a, b).block_until_ready()
            best = max(best, 2 * m * k * n_out * reps / (time.perf_counter() - t) / 1e9)
    return best


def prefill_shapes(config: Path | None, tokens: int = 1024) -> list[tuple[int, int, int]]:
    """The (m, k, n) of a prefill call's layer matmuls (8 lanes x 128 tokens): q/o, k/v, gate/up and down."""
    if config is None or not (config / "config.json").is_file():
        return []
    c = json.loads((config / "config.json").read_text())
    d, f = c["hidden_size"], c["intermediate_size"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    return [(tokens, d, d), (tokens, d, kv), (tokens, d, f), (tokens, f, d)]


def read_bandwidth(nbytes=256 << 20, reps=10) -> float:
    """GB/s of a jitted sum over a float32 array of nbytes."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones(nbytes // 4, jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        f(x).block_until_ready()
    return nbytes * reps / (time.perf_counter() - t) / 1e9


def machine_peaks(dtype: str, model: Path | None = None, before: dict | None = None) -> dict:
    """Matmul peaks (a square, and the model's prefill shapes when its config is at hand) and read bandwidth.
    With `before` (the same taken earlier in the run), each figure is the higher of the two: the machine's
    speed drifts over a run, and a percentage of a peak that dipped would flatter."""
    import jax
    import jax.numpy as jnp

    cpu = jax.devices("cpu")[0]
    dtypes = ["float32"] + (["bfloat16"] if dtype == "bfloat16" else [])
    with jax.default_device(cpu):
        peaks = {"read_gbs": read_bandwidth()}
        for name in dtypes:
            peaks[f"matmul_gflops_{name}"] = matmul_peak(jnp.dtype(name), shapes=None)
            if shapes := prefill_shapes(model):
                peaks[f"prefill_shapes_gflops_{name}"] = matmul_peak(jnp.dtype(name), shapes=shapes)
    for key, value in (before or {}).items():
        if isinstance(value, float) and key in peaks:
            peaks[key] = max(peaks[key], value)
    return {**peaks, "device": cpu.device_kind, "cores": os.cpu_count()}


def peaks_line(peaks: dict) -> str:
    out = f"XLA CPU matmul peak {peaks['matmul_gflops_float32']:.0f} GFLOP/s float32"
    if "prefill_shapes_gflops_float32" in peaks:
        out += f" ({peaks['prefill_shapes_gflops_float32']:.0f} on the model's prefill matmul shapes)"
    if "matmul_gflops_bfloat16" in peaks:
        out += f", {peaks['matmul_gflops_bfloat16']:.0f} bfloat16"
    return out + f"; read bandwidth {peaks['read_gbs']:.1f} GB/s"


def tiny_checkpoint(folder: Path) -> None:
    """A random Qwen2 with 8 small layers and the real vocabulary, plus the packaged Qwen2 tokenizer."""
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    cfg = transformers.Qwen2Config(
        vocab_size=151936, hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
    )  # fmt: skip
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(folder)
    for f in TOKENIZER.iterdir():
        if f.name != "README.md":
            shutil.copy(f, folder / f.name)


def model_facts(folder: Path) -> dict:
    """Layer count, eos ids (harvest's rule), non-embedding params and bytes read per decode step."""
    hf = json.loads((folder / "config.json").read_text())
    gen_file = folder / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    eos = list(QWEN2_EOS)
    for src in (gen, hf):
        e = src.get("eos_token_id")
        eos += e if isinstance(e, list) else [e] if e is not None else []
    d, v, n, f = hf["hidden_size"], hf["vocab_size"], hf["num_hidden_layers"], hf["intermediate_size"]
    hd = hf.get("head_dim") or d // hf["num_attention_heads"]
    q, kv = hf["num_attention_heads"] * hd, hf["num_key_value_heads"] * hd
    per_layer = (d * q + q) + 2 * (d * kv + kv) + q * d + 3 * d * f + 2 * d
    non_embed = n * per_layer + d
    eos = sorted({int(i) for i in eos if 0 <= int(i) < v})
    pad = hf.get("pad_token_id") or QWEN2_EOS[1]
    return dict(layers=n, eos=eos, pad=pad, non_embed=non_embed, step_params=non_embed + v * d)


def select(tokenizer, n_tasks: int, chat: bool) -> tuple[list[str], list[dict]]:
    """The first n_tasks tasks by id whose every test prompt fits MAX_PROMPT; one sequence per test input."""
    from harvest import arc

    tasks, _ = arc.load_tasks("arc-agi-1", "evaluation", seed=None)
    builder = arc.PromptBuilder(tokenizer, arc.PromptConfig(chat=chat))
    chosen, seqs = [], []
    for task in sorted(tasks, key=lambda t: t.id):
        built = [(s, builder.build(s).token_ids.tolist()) for s in arc.make_sequences([task])]
        if all(len(ids) <= MAX_PROMPT for _, ids in built):
            chosen.append(task.id)
            seqs += [{"key": f"{s.task_id}/{s.test_index}", "ids": ids} for s, ids in built]
        if len(chosen) == n_tasks:
            break
    return chosen, sorted(seqs, key=lambda s: -len(s["ids"]))


def harvest_config(model, dtype, layers, batch, out, data, chat, gen) -> dict:
    return {
        "model": {"path": str(model), "dtype": dtype},
        "data": {"source": "arc-agi-1", "split": "evaluation", "shuffle_seed": None, **data},
        "prompt": {"format": "digits", "chat": chat},
        "generation": {"temperature": 0.0, "samples": 1, **gen},
        "capture": {
            "hooks": [f"blocks.{i}.hook_resid_post" for i in layers],
            "phases": ["prefill", "decode"],
            "dtype": "float16",
            "codec": "blosc-zstd",
        },
        "runtime": {"batch_size": batch, "compile_cache": None, "progress": False},
        "output": {"path": str(out)},
    }


def spawner() -> None:
    """Child process that starts the sides: Linux counts the RSS of the process that forks a child in
    that child's ru_maxrss, so the sides are forked from this small process, never from the parent
    that has loaded JAX and torch. Reads one JSON request per line, answers one per line."""
    for line in sys.stdin:
        req = json.loads(line)
        with open(req["log"], "wb") as fh:
            t = time.perf_counter()
            pid = subprocess.Popen(req["cmd"], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).pid
            _, status, usage = os.wait4(pid, 0)
        answer = dict(seconds=time.perf_counter() - t, rss_kib=usage.ru_maxrss, rc=os.waitstatus_to_exitcode(status))
        print(json.dumps(answer), flush=True)


SPAWNER: list = []  # the spawner's Popen, started first thing in main()


def run_child(name: str, cmd: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one child process; its output goes to log."""
    sp = SPAWNER[0]
    sp.stdin.write(json.dumps({"cmd": cmd, "log": str(log)}) + "\n")
    sp.stdin.flush()
    r = json.loads(sp.stdout.readline())
    if r["rc"]:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        fail(f"the {name} side exited with {r['rc']}; full log {log}; its last lines:\n{tail}")
    return r["seconds"], r["rss_kib"] / 2**20


def run_harvest(name, cfg: dict, tmp: Path, overrides: list[str]) -> tuple[dict, float, float]:
    import yaml

    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "harvest.run", str(path), "--overwrite", *[a for o in overrides for a in ("--set", o)]]
    secs, rss = run_child(name, cmd, tmp / f"{name}.log")
    return json.loads((Path(cfg["output"]["path"]) / "summary.json").read_text()), secs, rss


def fmt(x, spec=".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def with_pct(value, pct) -> str:
    return "n/a" if value is None else f"{value:.1f} ({pct:.0f}%)"


def ratio(a, b):
    return None if a is None or b is None or not b else a / b


def side_row(name, prompt, generated, wall, inproc, pre, dec, comp, steps, rss, facts, peaks, dtype) -> dict:
    peak = max(peaks[f"matmul_gflops_{dtype}"], peaks.get(f"prefill_shapes_gflops_{dtype}", 0.0))  # the stricter
    gflops = ratio(2 * facts["non_embed"] * prompt / 1e9, pre)
    gbs = ratio(facts["step_params"] * (4 if dtype == "float32" else 2) * (steps or 0) / 1e9, dec if steps else None)
    return dict(
        side=name, prompt_tokens=prompt, generated_tokens=generated, seconds=wall,
        tokens_per_second=(prompt + generated) / wall, in_process_seconds=inproc,
        in_process_tokens_per_second=ratio(prompt + generated, inproc), prefill_seconds=pre, decode_seconds=dec,
        compile_seconds=comp, decode_steps=steps, prefill_gflops=gflops,
        prefill_pct_peak=ratio(gflops and 100 * gflops, peak), decode_tokens_per_second=ratio(generated, dec),
        decode_gbs=gbs, decode_pct_bandwidth=ratio(gbs and 100 * gbs, peaks["read_gbs"]), peak_rss_gib=rss,
    )  # fmt: skip


def print_table(rows: list[dict]) -> None:
    head = "side | prompt tok | generated tok | seconds | tok/s | in-process s | prefill s | decode s | compile s"
    head += " | prefill GFLOP/s (% peak) | decode tok/s | decode GB/s (% bw) | peak RSS GiB"
    print(f"\n| {head} |\n|{'---|' * (head.count('|') + 1)}")
    for r in rows:
        cells = [r["side"], r["prompt_tokens"], r["generated_tokens"], fmt(r["seconds"]), fmt(r["tokens_per_second"])]
        cells += [fmt(r[k]) for k in ("in_process_seconds", "prefill_seconds", "decode_seconds", "compile_seconds")]
        cells += [with_pct(r["prefill_gflops"], r["prefill_pct_peak"]), fmt(r["decode_tokens_per_second"])]
        cells.append(with_pct(r["decode_gbs"], r["decode_pct_bandwidth"]))
        cells.append(fmt(r["peak_rss_gib"], ".2f"))
        print("| " + " | ".join(map(str, cells)) + " |")


def compare(args, tmp: Path, peaks: dict) -> dict:
    from transformers import AutoTokenizer

    from harvest.store.shard import DEFAULT_CHUNK_BYTES, chunk_rows, codec_config

    folder = Path(args.model).expanduser()
    facts = model_facts(folder)
    prefill_only, samples = args.workload == "prefill-only", SAMPLES if args.workload == "samples" else 1
    answers = args.workload in ("answers", "samples")  # chat prompts, rows stop at EOS
    layers = hook_layers(facts["layers"])[:1] if prefill_only else hook_layers(facts["layers"])
    new = 0 if prefill_only else (16 if args.quick else 300) if answers else (16 if args.quick else 32)
    has_tok = (folder / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(folder if has_tok else TOKENIZER))
    ids, seqs = select(tokenizer, args.tasks, chat=answers)
    for f in folder.glob("*.safetensors"):  # warm the page cache: neither side pays the first disk read
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    n_prompt = sum(len(s["ids"]) for s in seqs)
    print(
        f"work: {args.workload}, {len(ids)} tasks, {len(seqs)} sequences, {n_prompt} prompt tokens "
        f"(max {len(seqs[0]['ids'])}), {'<= ' if answers else 'exactly '}{new} new tokens, batch {args.batch}, "
        f"{args.dtype}, hooks resid_post {layers} as float16"
        + (f", {samples} samples per prompt at temperature {TEMPERATURE}" if samples > 1 else "")
    )
    print(f"harvest overrides: {' '.join(args.harvest_set) or '(none)'}")

    gen = {"max_new_tokens": new, "fixed_length": not answers, "stop_strings": []}
    if samples > 1:
        gen.update(samples=samples, temperature=TEMPERATURE)
    cfg = harvest_config(
        folder, args.dtype, layers, args.batch, tmp / "harvest-out", {"tasks": ids, "max_prompt_tokens": MAX_PROMPT},
        answers, gen,
    )  # fmt: skip
    if prefill_only:
        cfg["capture"]["phases"] = ["prefill"]
    summary, h_wall, h_rss = run_harvest("harvest", cfg, tmp, args.harvest_set)
    s = summary["session"]

    d_model = json.loads((folder / "config.json").read_text())["hidden_size"]
    spec = dict(
        model=str(folder), dtype=args.dtype, sequences=seqs, batch=args.batch, max_new=new, fixed=not answers,
        eos_ids=facts["eos"], pad_id=facts["pad"], layers=layers, codec=codec_config("blosc-zstd"),
        chunk_rows=chunk_rows(d_model, 2, DEFAULT_CHUNK_BYTES), out_dir=str(tmp / "hf-out"),
        result=str(tmp / "hf-result.json"), samples=samples, temperature=TEMPERATURE,
    )  # fmt: skip
    if samples > 1:
        spec["batch"] = max(1, args.batch // samples)  # prompts per call: each brings `samples` rows
    (tmp / "hf-spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", "hf", str(tmp / "hf-spec.json")]
    t_wall, t_rss = run_child("transformers", cmd, tmp / "hf.log")
    hf = json.loads((tmp / "hf-result.json").read_text())
    peaks = machine_peaks(args.dtype, folder, before=peaks)
    print(f"\npeaks, the higher of before and after both sides: {peaks_line(peaks)}")

    rows = [
        side_row(
            "harvest", s["prompt_tokens"], s["generated_tokens"], h_wall, s.get("seconds"), s.get("prefill_seconds"),
            s.get("decode_seconds"), s.get("compile_seconds"), s.get("decode_steps"), h_rss, facts, peaks, args.dtype,
        ),
        side_row(
            "transformers", hf["prompt_tokens"], hf["generated_tokens"], t_wall, hf["seconds"], hf["prefill_seconds"],
            hf["decode_seconds"], None, hf["decode_steps"], t_rss, facts, peaks, args.dtype,
        ),
    ]  # fmt: skip
    print_table(rows)
    whole = ratio(rows[0]["tokens_per_second"], rows[1]["tokens_per_second"])
    inproc = ratio(rows[0]["in_process_tokens_per_second"], rows[1]["in_process_tokens_per_second"])
    print(f"\nharvest / transformers tok/s: {fmt(whole, '.2f')}x whole process, {fmt(inproc, '.2f')}x in-process")
    live = ratio(s["generated_tokens"], s.get("decode_steps"))  # each live row emits one token per step
    if live is not None:
        print(
            f"harvest decode: {live:.1f} live rows per step on average over {s['decode_steps']} steps "
            f"({s.get('tail_steps', 'n/a')} of them in the tail pool): the pool's occupancy, which scheduling sets"
        )

    out = Path(cfg["output"]["path"])
    h_bytes = sum(f.stat().st_size for f in out.glob("shards/*/acts/**/*") if f.is_file())
    agree = lengths_agree(out, hf["lengths"]) if samples == 1 else "n/a (sampled)"
    print(
        f"stored: harvest {summary.get('tokens')} tokens, {h_bytes / 2**20:.1f} MiB of activations; "
        f"transformers {hf['stored_tokens']} tokens, {hf['bytes'] / 2**20:.1f} MiB; "
        f"generated lengths agree on {agree} sequences"
    )
    every_copy = s["prompt_tokens"] + s["generated_tokens"]  # rows if each sequence stored its whole prompt
    stored_share = ratio(summary.get("tokens"), every_copy)
    if samples > 1:
        print(
            f"harvest stored {summary.get('tokens')} of {every_copy} rows ({fmt(stored_share and 100 * stored_share)}%"
            f" of storing every copy; about {fmt(stored_share and h_bytes / stored_share / 2**20)} MiB that way); "
            f"{s.get('shared_prompt_tokens', 'n/a')} prompt tokens copied, not prefilled; "
            f"harvest bytes / transformers bytes {fmt(ratio(h_bytes, hf['bytes']), '.3f')}"
        )
    if s["prompt_tokens"] != n_prompt * samples:
        print(f"WARNING: harvest counted {s['prompt_tokens']} prompt tokens, the selection has {n_prompt * samples}")
    return {"work": {"tasks": ids, "sequences": len(seqs), "max_new_tokens": new, "layers": layers}, "rows": rows,
            "ratio_whole_process": whole, "ratio_in_process": inproc, "harvest_act_bytes": h_bytes,
            "hf_act_bytes": hf["bytes"], "lengths_agree": agree, "stored_rows_of_every_copy": stored_share,
            "mean_live_rows": live, "peaks": peaks}  # fmt: skip


def lengths_agree(run: Path, hf_lengths: dict) -> str:
    try:
        from harvest.data import open_store

        t = open_store(run).sequences
        mine = {f"{t['task_id'][i]}/{t['test_index'][i]}": int(t["generated_length"][i]) for i in range(len(t))}
    except Exception as e:  # the check is a courtesy; the store API is not what this bench measures
        return f"n/a ({type(e).__name__})"
    return f"{sum(hf_lengths.get(k) == v for k, v in mine.items())}/{len(hf_lengths)}"


def rss_workload(args, tmp: Path) -> dict:
    model = args.rss_model or ("random:tiny" if args.quick else "random:0.5b")
    counts = [5, 10] if args.quick else [int(x) for x in args.rss_tasks.split(",")]
    layers = hook_layers(PRESET_LAYERS[model.split(":")[1]])
    print(f"rss: harvest only, {model}, {args.dtype}, 8 forced new tokens, batch {args.batch}, hooks {layers}")
    print(f"harvest overrides: {' '.join(args.harvest_set) or '(none)'}")
    print("\n| tasks | sequences | prompt tok | seconds | peak RSS GiB |\n|---|---|---|---|---|")
    rows = []
    for n in counts:
        gen = {"max_new_tokens": 8, "fixed_length": True}
        cfg = harvest_config(
            model, args.dtype, layers, args.batch, tmp / f"rss-{n}", {"limit": n, "max_prompt_tokens": MAX_PROMPT},
            "auto", gen,
        )  # fmt: skip
        summary, secs, rss = run_harvest(f"rss-{n}", cfg, tmp, args.harvest_set)
        rows.append(dict(tasks=n, sequences=summary.get("sequences"), prompt_tokens=summary["session"]["prompt_tokens"],
                         seconds=secs, peak_rss_gib=rss))  # fmt: skip
        print(f"| {n} | {rows[-1]['sequences']} | {rows[-1]['prompt_tokens']} | {secs:.1f} | {rss:.2f} |")
    long = None
    if args.rss_long:  # one long prompt: the ARC-AGI-2 training task whose base prompt is longest within the limit
        task_id, n_tok = longest_prompt_task(args.rss_long)
        gen = {"max_new_tokens": 8, "fixed_length": True}
        data = {"source": "arc-agi-2", "split": "training", "tasks": [task_id], "max_prompt_tokens": args.rss_long}
        cfg = harvest_config(model, args.dtype, layers, args.batch, tmp / "rss-long", data, False, gen)
        summary, secs, rss = run_harvest("rss-long", cfg, tmp, args.harvest_set)
        long = dict(task=task_id, prompt_tokens=summary["session"]["prompt_tokens"], seconds=secs, peak_rss_gib=rss)
        print(f"| ARC-AGI-2 training {task_id}, one {n_tok}-token prompt | 1 | {n_tok} | {secs:.1f} | {rss:.2f} |")
    return {"rows": rows, "long_prompt": long, "model": model}


def longest_prompt_task(limit: int) -> tuple[str, int]:
    """(task id, prompt tokens) of the ARC-AGI-2 training task with one test input whose base prompt is the
    longest of at most `limit` tokens (harvest's own prompt builder and packaged tokenizer)."""
    from harvest import arc
    from harvest.weights.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    tasks, _ = arc.load_tasks("arc-agi-2", "training", seed=None)
    builder = arc.PromptBuilder(tokenizer, arc.PromptConfig(chat=False))
    fits = []  # (tokens, task id)
    for task in tasks:
        seqs = arc.make_sequences([task])
        if len(seqs) == 1 and (n := len(builder.build(seqs[0]).token_ids)) <= limit:
            fits.append((n, task.id))
    n, task_id = max(fits)
    return task_id, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="answers", choices=["answers", "prompts", "samples", "prefill-only", "rss"])
    ap.add_argument("--model", default=REAL, help="Hugging Face Qwen2 folder (both sides load it)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tasks", type=int, default=None, help="tasks (default 48 answers, 16 prompts, 2 with --quick)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--harvest-set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--rss-tasks", default="50,100,400", help="rss workload: data.limit values")
    ap.add_argument("--rss-model", default=None, help="rss workload: random preset (default random:0.5b)")
    ap.add_argument("--rss-long", type=int, default=9216, help="rss workload: one more run, prompt <= this (0: none)")
    ap.add_argument("--json", help="also write every number here")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (configs, logs, outputs)")
    ap.add_argument("--quick", action="store_true", help="smoke mode: tiny random model, 2 tasks, 16 new tokens")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side == "hf":
        return hf_side(args.spec)
    if args.side == "spawner":
        return spawner()
    me = [sys.executable, str(Path(__file__).resolve()), "--side", "spawner"]
    SPAWNER.append(subprocess.Popen(me, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    if args.tasks is None:
        args.tasks = (
            2 if args.quick else {"answers": 48, "prompts": 16, "samples": 16, "prefill-only": 48}.get(args.workload)
        )
    folder = Path(args.model).expanduser()
    if not (args.quick or args.workload == "rss" or (folder / "config.json").is_file()):
        fail(f"model folder {folder} is missing or has no config.json; run ../shared/tools/real-qwen-checkpoint")
    tmp = Path(tempfile.mkdtemp(prefix="harvest-vs-hf-"))
    if args.quick and args.workload != "rss":
        args.model = str(tmp / "tiny-qwen2")
        tiny_checkpoint(Path(args.model))
    peaks = machine_peaks(args.dtype, None if args.workload == "rss" else Path(args.model))
    print(f"machine: {peaks['device']}, {peaks['cores']} cores; {peaks_line(peaks)}")
    print(f"model: {'random preset' if args.workload == 'rss' else args.model}; temp folder {tmp}")
    result = rss_workload(args, tmp) if args.workload == "rss" else compare(args, tmp, peaks)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": peaks, **result}, indent=2))
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
