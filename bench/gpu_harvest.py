"""GPU baseline benchmark of harvest's engine and pipeline (run by bench/gpu.sh).

    python bench/gpu_harvest.py micro --model 0.5b --results R.jsonl [--quick] [--deadline EPOCH]
    python bench/gpu_harvest.py pipeline --results R.jsonl [--deadline EPOCH] -- CONFIG [--set k=v ...]
    python bench/gpu_harvest.py report --results R.jsonl

micro: random weights of a harvest preset (random:0.5b / random:1.5b shapes) in bfloat16; measures
  - ceilings in this process: a jitted bf16 8192^3 matmul (preferred_element_type=float32) and a
    device-to-device copy of a 4 GiB array (bytes read + written);
  - prefill (harvest.engine.prefill.prefill): tokens/s, MFU, compile seconds;
  - decode (harvest.engine.decode.decode, DecodeConfig from GenerateConfig(fixed_length=True)) at
    several batch sizes: ms/step, tokens/s, HBM bandwidth utilisation, compile seconds.
pipeline: `harvest run` exactly as `python -m harvest.run` runs it (harvest.run.main), in this
  process, with timers wrapped around the background writer and BatchOutput.to_host so the report
  can say whether the writer kept up; compile events are counted through jax.monitoring.
report: one table from the results file.

Weights are drawn on the device with jax.random in the preset's shapes (harvest's own random
preset draws them with numpy on the host, which takes tens of seconds for 1.5B; values do not
change the timings). Every number printed is also appended as JSON to --results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NOMINAL_BF16_TFLOPS = 989.0  # H200 SXM dense bf16, datasheet
NOMINAL_HBM_TBS = 4.8  # H200 HBM3e, datasheet

# ----------------------------------------------------------------------------- helpers

_COMPILE = {"backend_s": 0.0, "trace_s": 0.0, "lower_s": 0.0, "n": 0, "n_big": 0}


def _listen_compiles():
    import jax

    def on(event, duration, **kw):
        if event.endswith("backend_compile_duration"):
            _COMPILE["backend_s"] += duration
            _COMPILE["n"] += 1
            _COMPILE["n_big"] += duration > 1.0
        elif event.endswith("jaxpr_trace_duration"):
            _COMPILE["trace_s"] += duration
        elif event.endswith("jaxpr_to_mlir_module_duration"):
            _COMPILE["lower_s"] += duration

    jax.monitoring.register_event_duration_secs_listener(on)


def compile_snapshot():
    return dict(_COMPILE)


def compile_delta(before):
    return {k: _COMPILE[k] - before[k] for k in _COMPILE}


def emit(results: Path | None, rec: dict):
    if results is not None:
        with open(results, "a") as f:
            f.write(json.dumps(rec) + "\n")


def left(deadline: float | None) -> float:
    return float("inf") if deadline is None else deadline - time.time()


def timed(fn, *args, **kw):
    import jax

    t = time.perf_counter()
    out = fn(*args, **kw)
    jax.block_until_ready(out)
    return time.perf_counter() - t, out


# ----------------------------------------------------------------------------- ceilings


def measure_peaks(quick: bool) -> dict:
    import jax
    import jax.numpy as jnp

    n = 512 if quick else 8192
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    jax.block_until_ready(mm(a, b))
    reps, best = (3 if quick else 20), float("inf")
    for _ in range(3):
        t = time.perf_counter()
        outs = [mm(a, b) for _ in range(reps)]
        jax.block_until_ready(outs)
        best = min(best, (time.perf_counter() - t) / reps)
        del outs
    matmul_tflops = 2 * n**3 / best / 1e12
    del a, b

    nbytes = (64 << 20) if quick else (4 << 30)
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    cp = jax.jit(jnp.copy)
    y = cp(x)
    jax.block_until_ready(y)
    how = "jit(jnp.copy)"
    try:
        if y.unsafe_buffer_pointer() == x.unsafe_buffer_pointer():  # forwarded, not copied
            cp, how = jax.jit(lambda v: v + jnp.bfloat16(0)), "jit(x + 0)"
            jax.block_until_ready(cp(x))
    except Exception:  # noqa: BLE001 - pointer check is best effort
        pass
    del y
    best_c = float("inf")
    for _ in range(5):
        t, y = timed(cp, x)
        best_c = min(best_c, t)
        del y
    del x
    copy_tbs = 2 * nbytes / best_c / 1e12  # bytes read + written
    return dict(
        kind="peaks",
        device=str(jax.devices()[0].device_kind),
        backend=jax.default_backend(),
        jax=jax.__version__,
        matmul_n=n,
        matmul_ms=best * 1e3,
        matmul_tflops=matmul_tflops,
        copy_gib=nbytes / 2**30,
        copy_ms=best_c * 1e3,
        copy_tbs=copy_tbs,
        copy_how=how,
    )


# ----------------------------------------------------------------------------- model


def make_model(preset: str, seed: int = 0):
    """ModelConfig and bf16 params of harvest's random:<preset> shape, drawn on the device."""
    import jax
    import jax.numpy as jnp

    from harvest.engine import params as P
    from harvest.engine.config import ModelConfig, preset_hf_config
    from harvest.engine.stopping import eos_ids_for

    hf = preset_hf_config(preset)
    cfg = ModelConfig.from_hf(hf)
    key = jax.random.key(seed)
    leaves = {}
    for i, leaf in enumerate(P.iter_specs(cfg)):
        k = jax.random.fold_in(key, i)
        if leaf.spec.init == "ones":
            x = 1.0 + 0.1 * jax.random.normal(k, leaf.shape, jnp.float32)
        elif leaf.spec.init == "bias":
            x = 0.1 * jax.random.normal(k, leaf.shape, jnp.float32)
        else:
            x = 0.02 * jax.random.normal(k, leaf.shape, jnp.float32)
        leaves[leaf.path] = x.astype(jnp.bfloat16)
    params = P.assemble(cfg, leaves)
    jax.block_until_ready(params)
    return cfg, params, eos_ids_for(hf, None, cfg.vocab_size)


def param_counts(cfg, params) -> dict:
    from harvest.engine import params as P

    total = P.num_params(params)
    embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return dict(total=total, non_embedding=total - embed, head=cfg.vocab_size * cfg.d_model)


def bench_hooks(cfg):
    from harvest.engine.hooks import parse_hooks

    layers = sorted({cfg.n_layers // 4, cfg.n_layers // 2, (3 * cfg.n_layers) // 4})
    return parse_hooks([f"blocks.{i}.hook_resid_post" for i in layers], cfg)


# ----------------------------------------------------------------------------- prefill


def bench_prefill(cfg, params, hooks, counts, peaks, *, batch, plen, new_tokens, chunk, reps) -> dict:
    import jax
    import jax.numpy as jnp

    from harvest.engine.prefill import attention_chunk, prefill

    tokens = jax.random.randint(jax.random.key(1), (batch, plen), 0, cfg.vocab_size, jnp.int32)
    lengths = jnp.full((batch,), plen, jnp.int32)
    kw = dict(hooks=hooks, cache_len=plen + new_tokens, max_chunk=chunk)
    c0 = compile_snapshot()
    t_first, out = timed(prefill, cfg, params, tokens, lengths, **kw)
    comp = compile_delta(c0)
    del out
    t_second, out = timed(prefill, cfg, params, tokens, lengths, **kw)
    del out
    times = []
    for _ in range(reps):
        t, out = timed(prefill, cfg, params, tokens, lengths, **kw)
        times.append(t)
        del out
    times.sort()
    t_med = times[len(times) // 2]
    n_tok = batch * plen
    # FLOPs: 2 x non-embedding params per token (every matmul weight once per token), plus causal
    # attention that is actually needed (QK^T and PV over j <= i: 2 matmuls x 2 FLOP x H x Dh per
    # (i, j) pair, P(P+1)/2 pairs per row), plus the LM head at each row's last token.
    f_dense = 2 * counts["non_embedding"] * n_tok
    f_attn = cfg.n_layers * 4 * batch * cfg.n_heads * cfg.head_dim * plen * (plen + 1) // 2
    f_head = 2 * batch * cfg.d_model * cfg.vocab_size
    flops = f_dense + f_attn + f_head
    achieved = flops / t_med / 1e12
    return dict(
        batch=batch,
        plen=plen,
        chunk=attention_chunk(plen, chunk),
        n_hooks=len(hooks),
        ms=t_med * 1e3,
        ms_min=times[0] * 1e3,
        ms_max=times[-1] * 1e3,
        tokens_per_s=n_tok / t_med,
        tflop=flops / 1e12,
        tflop_dense=f_dense / 1e12,
        tflop_attn=f_attn / 1e12,
        tflops=achieved,
        mfu_measured=achieved / peaks["matmul_tflops"],
        mfu_nominal=achieved / NOMINAL_BF16_TFLOPS,
        first_s=t_first,
        second_s=t_second,
        compile_s=t_first - t_second,
        xla_backend_compile_s=comp["backend_s"],
        xla_compiles=comp["n"],
    )


# ----------------------------------------------------------------------------- decode


def bench_decode(cfg, params, hooks, counts, peaks, eos_ids, *, batch, plen, new_tokens, reps) -> dict:
    import jax
    import jax.numpy as jnp

    from harvest.engine.decode import decode
    from harvest.engine.generate import GenerateConfig, Generator
    from harvest.engine.sampling import row_keys

    gcfg = GenerateConfig(batch_size=batch, max_new_tokens=new_tokens, fixed_length=True, decode_hooks=hooks)
    gen = Generator(cfg, params, gcfg, eos_ids=eos_ids)
    cache_len = plen + new_tokens
    shape = (batch, cache_len, cfg.n_kv_heads, cfg.head_dim)
    logits = jax.random.normal(jax.random.key(2), (batch, cfg.vocab_size), jnp.float32)
    lengths = jnp.full((batch,), plen, jnp.int32)
    active = jnp.ones((batch,), bool)
    keys = row_keys(0, list(range(batch)))

    def fresh_cache():  # decode donates the cache, so each call gets a new one (outside the timer)
        c = tuple((jnp.zeros(shape, jnp.bfloat16), jnp.zeros(shape, jnp.bfloat16)) for _ in range(cfg.n_layers))
        return jax.block_until_ready(c)

    def call():
        cache = fresh_cache()
        t = time.perf_counter()
        out = decode(
            cfg,
            gen.dcfg,
            params,
            cache,
            logits,
            lengths,
            active,
            keys,
            gen.is_eos,
            gen.stop_table,
            gen.stop_lengths,
            prompt_len=plen,
        )
        jax.block_until_ready(out)
        dt = time.perf_counter() - t
        n = int(out["num_generated"].sum())
        del out
        return dt, n

    c0 = compile_snapshot()
    t_first, n_gen = call()
    comp = compile_delta(c0)
    t_second, _ = call()
    times = sorted(call()[0] for _ in range(reps))
    t_med = times[len(times) // 2]
    step = t_med / new_tokens
    # Bytes read per step: every non-embedding weight, the LM head (= embedding, tied), the
    # embedding rows gathered, and the KV cache. The engine attends all S_max = P + T columns
    # every step (masked, not skipped), so the whole cache is read each step.
    itemsize = 2
    w_bytes = counts["non_embedding"] * itemsize
    head_bytes = counts["head"] * itemsize
    kv_bytes = 2 * cfg.n_layers * batch * cache_len * cfg.n_kv_heads * cfg.head_dim * itemsize
    emb_bytes = batch * cfg.d_model * itemsize
    step_bytes = w_bytes + head_bytes + kv_bytes + emb_bytes
    bw = step_bytes / step / 1e12
    return dict(
        batch=batch,
        plen=plen,
        new_tokens=new_tokens,
        generated=n_gen,
        n_hooks=len(hooks),
        ms_per_step=step * 1e3,
        ms_per_step_min=times[0] / new_tokens * 1e3,
        tokens_per_s=batch * new_tokens / t_med,
        bytes_per_step_gb=step_bytes / 1e9,
        weight_gb=(w_bytes + head_bytes) / 1e9,
        kv_gb=kv_bytes / 1e9,
        hbm_tbs=bw,
        hbm_util_copy=bw / peaks["copy_tbs"],
        hbm_util_nominal=bw / NOMINAL_HBM_TBS,
        first_s=t_first,
        second_s=t_second,
        compile_s=t_first - t_second,
        xla_backend_compile_s=comp["backend_s"],
        xla_compiles=comp["n"],
    )


# ----------------------------------------------------------------------------- micro driver


def cmd_micro(a) -> int:
    import jax

    _listen_compiles()
    results = Path(a.results) if a.results else None
    quick = a.quick
    print(f"== micro: random:{a.model} bfloat16 on {jax.devices()[0].device_kind} (jax {jax.__version__})")
    peaks = None
    if results is not None and results.exists():
        for line in results.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "peaks":
                peaks = rec
    if peaks is None:
        peaks = measure_peaks(quick)
        emit(results, peaks)
        print(
            f"  ceilings: bf16 {peaks['matmul_n']}^3 matmul (f32 acc) {peaks['matmul_tflops']:.0f} TFLOP/s "
            f"({peaks['matmul_ms']:.2f} ms; nominal H200 SXM dense bf16 {NOMINAL_BF16_TFLOPS:.0f}); "
            f"D2D copy {peaks['copy_gib']:.2f} GiB via {peaks['copy_how']}: {peaks['copy_tbs']:.2f} TB/s "
            f"read+written ({peaks['copy_ms']:.2f} ms; nominal HBM {NOMINAL_HBM_TBS} TB/s)"
        )
    else:
        print(f"  ceilings (from earlier in this run): matmul {peaks['matmul_tflops']:.0f} TFLOP/s, "
              f"copy {peaks['copy_tbs']:.2f} TB/s")  # fmt: skip

    t = time.perf_counter()
    cfg, params, eos_ids = make_model(a.model)
    counts = param_counts(cfg, params)
    hooks = bench_hooks(cfg)
    print(
        f"  model {a.model}: {counts['total'] / 1e6:.1f} M params, "
        f"{counts['non_embedding'] / 1e6:.1f} M non-embedding, "
        f"{cfg.n_layers} layers, d {cfg.d_model}, heads {cfg.n_heads}/{cfg.n_kv_heads}x{cfg.head_dim}, "
        f"mlp {cfg.d_mlp}; hooks {','.join(h.name for h in hooks)}; init {time.perf_counter() - t:.1f} s"
    )
    base = dict(model=a.model, params=counts["total"], non_embedding=counts["non_embedding"])

    if left(a.deadline) > a.need_prefill:
        try:
            r = bench_prefill(
                cfg, params, hooks, counts, peaks,
                batch=a.prefill_batch, plen=a.prefill_len, new_tokens=a.new_tokens, chunk=a.chunk, reps=a.reps,
            )  # fmt: skip
            emit(results, dict(kind="prefill", **base, **r))
            print(
                f"  prefill B={r['batch']} x P={r['plen']} (attention chunk {r['chunk']}): {r['ms']:.1f} ms "
                f"(min {r['ms_min']:.1f}, max {r['ms_max']:.1f}), {r['tokens_per_s']:,.0f} tok/s, "
                f"{r['tflop']:.2f} TFLOP ({r['tflop_dense']:.2f} dense + {r['tflop_attn']:.2f} attention) -> "
                f"{r['tflops']:.0f} TFLOP/s = MFU {100 * r['mfu_measured']:.1f}% of measured matmul peak, "
                f"{100 * r['mfu_nominal']:.1f}% of nominal {NOMINAL_BF16_TFLOPS:.0f}; "
                f"compile {r['compile_s']:.1f} s (first {r['first_s']:.1f} s, "
                f"XLA backend {r['xla_backend_compile_s']:.1f} s)"
            )
        except Exception as e:  # noqa: BLE001 - report and go on
            emit(results, dict(kind="prefill", **base, error=f"{type(e).__name__}: {e}"[:500]))
            print(f"  prefill FAILED: {type(e).__name__}: {str(e)[:300]}")
    else:
        print(f"  prefill skipped: {left(a.deadline):.0f} s left")

    for b in a.decode_batches:
        if left(a.deadline) < a.need_decode:
            print(f"  decode B={b} skipped: {left(a.deadline):.0f} s left")
            emit(results, dict(kind="decode", **base, batch=b, skipped=True))
            continue
        try:
            r = bench_decode(
                cfg, params, hooks, counts, peaks, eos_ids,
                batch=b, plen=a.decode_prompt, new_tokens=a.new_tokens, reps=a.reps,
            )  # fmt: skip
            emit(results, dict(kind="decode", **base, **r))
            print(
                f"  decode B={b:<3} P={r['plen']} T={r['new_tokens']}: {r['ms_per_step']:.2f} ms/step "
                f"(min {r['ms_per_step_min']:.2f}), {r['tokens_per_s']:,.0f} tok/s; "
                f"reads {r['bytes_per_step_gb']:.3f} GB/step "
                f"(weights+head {r['weight_gb']:.3f}, KV {r['kv_gb']:.3f}) -> {r['hbm_tbs']:.2f} TB/s = "
                f"{100 * r['hbm_util_copy']:.1f}% of measured copy BW; compile {r['compile_s']:.1f} s "
                f"(first {r['first_s']:.1f} s, XLA backend {r['xla_backend_compile_s']:.1f} s)"
            )
        except Exception as e:  # noqa: BLE001
            emit(results, dict(kind="decode", **base, batch=b, error=f"{type(e).__name__}: {e}"[:500]))
            print(f"  decode B={b} FAILED: {type(e).__name__}: {str(e)[:300]}")
    return 0


# ----------------------------------------------------------------------------- pipeline driver


def cmd_pipeline(a, harvest_args: list[str]) -> int:
    """Run harvest.run.main(harvest_args) with timers around the writer and device waits."""
    t_start = time.perf_counter()
    import jax

    _listen_compiles()
    import harvest.cli.pipeline as pl
    from harvest.engine import generate as gen
    from harvest.store.writer import BackgroundWriter

    w = dict(device_wait_s=0.0, d2h_s=0.0, put_blocked_s=0.0, puts=0, batches=[])
    orig_to_host = gen.BatchOutput.to_host

    def to_host(self):
        t0 = time.perf_counter()
        jax.block_until_ready((self.tokens, self.prefill_acts, self.decode_acts))
        t1 = time.perf_counter()
        out = orig_to_host(self)
        t2 = time.perf_counter()
        w["device_wait_s"] += t1 - t0
        w["d2h_s"] += t2 - t1
        w["batches"].append(dict(ready_at=t1 - t_start, wait=t1 - t0, d2h=t2 - t1))
        return out

    gen.BatchOutput.to_host = to_host

    class TimedWriter(BackgroundWriter):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            w["writer_started_at"] = time.perf_counter() - t_start

        def put(self, item):
            t0 = time.perf_counter()
            super().put(item)
            w["put_blocked_s"] += time.perf_counter() - t0
            w["puts"] += 1

        def close(self):
            t0 = time.perf_counter()
            w.setdefault("close_started_at", t0 - t_start)
            st = super().close()
            w.setdefault("close_s", time.perf_counter() - t0)
            w["stats"] = st.as_dict()
            return st

    pl.BackgroundWriter = TimedWriter
    from harvest.run import main

    rc = main(harvest_args)
    w["process_s"] = time.perf_counter() - t_start
    w["compile"] = compile_snapshot()
    emit(Path(a.results) if a.results else None, dict(kind="pipeline_writer", rc=rc, **w))
    return rc


def report_pipeline(results: Path, run_dir: Path, wall: float | None) -> None:
    """Print the pipeline's summary and writer timings (called by gpu.sh after the run)."""
    recs = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
    w = next((r for r in reversed(recs) if r.get("kind") == "pipeline_writer"), None)
    sfile = run_dir / "summary.json"
    out = dict(kind="pipeline", wall_s=wall)
    if sfile.is_file():
        s = json.loads(sfile.read_text())
        ss = s["session"]
        out.update(
            sequences=s["sequences"],
            tokens=s["tokens"],
            bytes_on_disk=s["bytes_on_disk"],
            compression=s["compression_ratio"],
            session_s=ss["seconds"],
            prompt_tokens=ss["prompt_tokens"],
            generated_tokens=ss["generated_tokens"],
            tokens_per_s=ss["tokens_per_second"],
        )
        print(
            f"  summary.json: {s['sequences']} sequences, {ss['prompt_tokens']:,} prompt + "
            f"{ss['generated_tokens']:,} generated tokens in {ss['seconds']:.1f} s (generation loop, compile included) "
            f"-> session.tokens_per_second {ss['tokens_per_second']:,.1f}; "
            f"{s['bytes_on_disk'] / 2**20:,.1f} MiB on disk, "
            f"compression {s['compression_ratio']:.2f}x"
        )
        if wall:
            n = ss["prompt_tokens"] + ss["generated_tokens"]
            print(f"  whole process {wall:.1f} s -> {n / wall:,.0f} tok/s end to end")
    else:
        print(f"  no {sfile} (the run did not finish)")
    if w:
        st = w.get("stats", {})
        busy = w.get("stats") and (st["copy_seconds"] - w["device_wait_s"] + st["write_seconds"])
        loop = (w.get("close_started_at", 0) + w.get("close_s", 0)) - w.get("writer_started_at", 0)
        c = w.get("compile", {})
        out.update(
            writer_loop_s=loop,
            writer_busy_s=busy,
            writer_device_wait_s=w["device_wait_s"],
            writer_d2h_s=w["d2h_s"],
            writer_write_s=st.get("write_seconds"),
            writer_records_s=st and st["copy_seconds"] - w["device_wait_s"] - w["d2h_s"],
            put_blocked_s=w["put_blocked_s"],
            drain_s=w.get("close_s"),
            xla_compiles=c.get("n"),
            xla_compiles_over_1s=c.get("n_big"),
            xla_backend_compile_s=c.get("backend_s"),
            process_s=w.get("process_s"),
        )
        print(
            f"  XLA: {c.get('n')} compiles ({c.get('n_big')} over 1 s), backend compile {c.get('backend_s', 0):.1f} s, "
            f"tracing {c.get('trace_s', 0):.1f} s, lowering {c.get('lower_s', 0):.1f} s"
        )
        if st:
            print(
                f"  writer: generation loop {loop:.1f} s (writer start -> close); in the writer thread: waiting for "
                f"the GPU {w['device_wait_s']:.1f} s, device->host {w['d2h_s']:.2f} s, building records "
                f"{out['writer_records_s']:.2f} s, shard writes {st['write_seconds']:.2f} s "
                f"({st['shards_written']} shards, {st['bytes_written'] / 2**20:,.1f} MiB, "
                f"{st['bytes_written'] / 2**20 / max(st['write_seconds'], 1e-9):,.0f} MiB/s) -> busy {busy:.2f} s "
                f"= {100 * busy / max(loop, 1e-9):.0f}% of the loop"
            )
            print(
                f"  main thread blocked in writer.put {w['put_blocked_s']:.2f} s over {w['puts']} batches; "
                f"drain after the last batch (close) {w.get('close_s', 0):.2f} s"
            )
            for i, b in enumerate(w["batches"]):
                print(
                    f"    batch {i}: results ready at t={b['ready_at']:.1f} s "
                    f"(writer waited {b['wait']:.1f} s for the GPU), D2H {b['d2h']:.2f} s"
                )
            last = w["batches"][-1] if w["batches"] else None
            end = w.get("close_started_at", 0) + w.get("close_s", 0)
            tail = end - (last["ready_at"] + last["d2h"]) if last else float("nan")
            out["writer_tail_s"] = tail
            print(
                f"  after the last batch's results were on the host, the writer needed {tail:.2f} s more "
                f"(records + final shard write): the only wall time the writer adds if it kept up"
            )
            frac = busy / max(loop, 1e-9)
            kept = frac < 0.5
            print(
                f"  writer kept up: {'YES' if kept else 'NO / marginal'} (busy {100 * frac:.0f}% of the loop, "
                f"not counting its waits for the GPU; put() blocked {w['put_blocked_s']:.2f} s)"
            )
            out["writer_kept_up"] = bool(kept)
    emit(results, out)


# ----------------------------------------------------------------------------- report


def cmd_report(a) -> int:
    results = Path(a.results)
    recs = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
    peaks = next((r for r in recs if r.get("kind") == "peaks"), None)
    print("== summary")
    if peaks:
        print(
            f"  device {peaks['device']} ({peaks['backend']}, jax {peaks['jax']}); matmul peak "
            f"{peaks['matmul_tflops']:.0f} TFLOP/s (nominal {NOMINAL_BF16_TFLOPS:.0f}); copy "
            f"{peaks['copy_tbs']:.2f} TB/s (nominal {NOMINAL_HBM_TBS})"
        )
    print(f"  {'model':6} {'phase':8} {'B':>4} {'len':>5} {'ms':>9} {'tok/s':>11} {'util':>7} {'compile s':>9}")
    for r in recs:
        if r.get("error") or r.get("skipped"):
            if r.get("kind") in ("prefill", "decode"):
                why = "skipped" if r.get("skipped") else r["error"][:60]
                print(f"  {r['model']:6} {r['kind']:8} {r.get('batch', ''):>4} {why}")
            continue
        if r.get("kind") == "prefill":
            print(
                f"  {r['model']:6} {'prefill':8} {r['batch']:>4} {r['plen']:>5} {r['ms']:>9.1f} "
                f"{r['tokens_per_s']:>11,.0f} {100 * r['mfu_measured']:>6.1f}% {r['compile_s']:>9.1f}"
                "   (MFU vs measured matmul)"
            )
        elif r.get("kind") == "decode":
            print(
                f"  {r['model']:6} {'decode':8} {r['batch']:>4} {r['plen']:>5} {r['ms_per_step']:>9.2f} "
                f"{r['tokens_per_s']:>11,.0f} {100 * r['hbm_util_copy']:>6.1f}% {r['compile_s']:>9.1f}"
                "   (ms/step; HBM vs measured copy)"
            )
        elif r.get("kind") == "pipeline" and r.get("tokens_per_s") is not None:
            print(
                f"  pipeline: {r['tokens_per_s']:,.1f} tok/s (summary.json, compile included), whole process "
                f"{r['wall_s']:.1f} s, XLA backend compile {r.get('xla_backend_compile_s') or 0:.1f} s, "
                f"writer busy {r.get('writer_busy_s') or 0:.1f} s of {r.get('writer_loop_s') or 0:.1f} s, "
                f"kept up: {r.get('writer_kept_up')}"
            )
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    harvest_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, harvest_args = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["micro", "pipeline", "pipeline-report", "report"])
    ap.add_argument("--results", default=None)
    ap.add_argument("--deadline", type=float, default=None, help="epoch seconds; later sections are skipped")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke test")
    ap.add_argument("--model", default="0.5b")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--wall", type=float, default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.prefill_batch, a.prefill_len, a.chunk, a.new_tokens, a.reps = 2, 128, 64, 4, 2
        a.decode_batches, a.decode_prompt = [2, 4], 64
        a.need_prefill = a.need_decode = 0
    else:
        a.prefill_batch, a.prefill_len, a.chunk, a.new_tokens, a.reps = 16, 1024, 512, 64, 5
        a.decode_batches, a.decode_prompt = [8, 32, 128], 1024
        a.need_prefill, a.need_decode = 45, 35
    if a.command == "micro":
        return cmd_micro(a)
    if a.command == "pipeline":
        return cmd_pipeline(a, harvest_args)
    if a.command == "pipeline-report":
        report_pipeline(Path(a.results), Path(a.run_dir), a.wall)
        return 0
    return cmd_report(a)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
