"""GPU baseline benchmark of harvest's engine and pipeline (run by bench/gpu.sh).

    python bench/gpu_harvest.py micro --model 0.5b --results R.jsonl [--quick] [--deadline EPOCH]
    python bench/gpu_harvest.py pipeline --results R.jsonl -- CONFIG [--set k=v ...]
    python bench/gpu_harvest.py pipeline-report --results R.jsonl --run-dir DIR [--wall SECONDS]
    python bench/gpu_harvest.py report --results R.jsonl

micro: random weights of a harvest preset (random:0.5b / random:1.5b shapes) in bfloat16; measures
  - ceilings in this process: a jitted bf16 8192^3 matmul (preferred_element_type=float32) and a
    device-to-device copy of a 4 GiB array (bytes read + written);
  - prefill (harvest.engine.prefill.prefill_chunk) for several lanes x chunk shapes: R lanes of one
    C-token chunk each, into a pool of R slots, one call per chunk offset 0, C, 2C, ... of a P-token
    prompt (so the later calls attend over the cache the earlier ones wrote): ms per offset, tokens/s
    and MFU of the whole prompt, compile seconds and compiles;
  - decode (harvest.engine.decode.decode_segment, DecodeConfig from GenerateConfig(fixed_length=True))
    on a full pool for several decode_slots: every slot live at a P-token prompt, segments of
    `segment_steps` steps (no row stops: fixed_length, and T covers every segment run): ms/step,
    tokens/s, HBM bandwidth utilisation, compile seconds and compiles.
  Items run in priority order (the likely GPU settings first) and are skipped when --deadline is near.
pipeline: `harvest run` exactly as `python -m harvest.run` runs it (harvest.run.main), in this
  process, with timers around the background writer and the main thread's reads of finished slots
  (generate.read_slot + device->host), so the report can say whether the writer kept up; the
  engine's own timings and compile count come from summary.json["session"].
report: one table from the results file.

Compiles are counted with harvest.engine.generate.CompileCounter (XLA backend compiles and their
seconds); a listener here adds tracing and lowering seconds. Weights are drawn on the device with
jax.random in the preset's shapes (harvest's own random preset draws them with numpy on the host,
which takes tens of seconds for 1.5B; values do not change the timings). Every number printed is
also appended as JSON to --results.

Dropped with the continuous-batching engine: the per-bucket prefill compile (one prefill program now
serves every prompt length) and the one-call whole-prompt prefill (prefill is a sequence of chunk
calls); decode "batch size" is now the pool size (decode_slots); the writer thread no longer waits
for the GPU or copies device->host (the main thread reads each finished slot, the writer gets host
arrays), so the per-batch "writer waited for the GPU" lines became the main thread's read time and
the times at which finished sequences were handed over.
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

_EXTRA = {"trace_s": 0.0, "lower_s": 0.0, "n_big": 0}  # beyond what CompileCounter counts


def _listen_compiles():
    import jax

    import harvest.engine.generate  # noqa: F401 - importing it registers CompileCounter's listener

    def on(event, duration, **kw):
        if event.endswith("backend_compile_duration"):
            _EXTRA["n_big"] += duration > 1.0
        elif event.endswith("jaxpr_trace_duration"):
            _EXTRA["trace_s"] += duration
        elif event.endswith("jaxpr_to_mlir_module_duration"):
            _EXTRA["lower_s"] += duration

    jax.monitoring.register_event_duration_secs_listener(on)


def compile_snapshot() -> dict:
    from harvest.engine.generate import CompileCounter

    return dict(n=CompileCounter.count, backend_s=CompileCounter.seconds, **_EXTRA)


def compile_delta(before: dict) -> dict:
    now = compile_snapshot()
    return {k: now[k] - before[k] for k in now}


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


def g3(x: float) -> str:
    """3 significant digits, no exponent below 1000: readable on an H200 and on a CPU smoke test."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


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


def bench_prefill(cfg, params, hooks, counts, peaks, *, lanes, chunk, plen, new_tokens, reps) -> dict:
    """prefill_chunk on a pool of `lanes` slots: one P-token prompt per lane, P / C calls per prompt."""
    import jax
    import jax.numpy as jnp

    from harvest.engine.prefill import prefill_chunk
    from harvest.engine.state import PrefillChunk, empty_state

    n_chunks = max(1, plen // chunk)
    plen = n_chunks * chunk
    cache_len = plen + new_tokens  # as the pipeline sizes it: the prompt room, then the answer
    state = empty_state(cfg, lanes, cache_len, new_tokens, (), 0, params["embed"].dtype)
    tokens = jax.random.randint(jax.random.key(1), (n_chunks, lanes, chunk), 0, cfg.vocab_size, jnp.int32)
    slot = jnp.arange(lanes, dtype=jnp.int32)
    ids = jnp.arange(lanes, dtype=jnp.uint32)
    full = lambda v, dtype=jnp.int32: jnp.full((lanes,), v, dtype)
    chunks = [
        PrefillChunk(slot, tokens[i], full(i * chunk), full(chunk), full(i == n_chunks - 1, bool), ids, jnp.uint32(0))
        for i in range(n_chunks)
    ]
    jax.block_until_ready((state, chunks))

    def call(i):  # the state is donated, so each call continues from the previous one's
        nonlocal state
        t = time.perf_counter()
        state, acts = prefill_chunk(cfg, hooks, params, state, chunks[i])
        jax.block_until_ready((state, acts))
        return time.perf_counter() - t

    c0 = compile_snapshot()
    t_first = call(0)
    comp = compile_delta(c0)
    for i in range(1, n_chunks):  # warm every offset once
        call(i)
    times = [[] for _ in range(n_chunks)]
    for _ in range(reps):
        for i in range(n_chunks):
            times[i].append(call(i))
    chunk_s = [median(t) for t in times]
    t_prompt = sum(chunk_s)
    n_tok = lanes * plen
    # Useful FLOPs: 2 x non-embedding params per token (every matmul weight once per token), plus causal
    # attention (QK^T and PV: 2 matmuls x 2 FLOP x H x Dh per (query, key) pair with key <= query, over
    # the chunk and the cache before it), plus the LM head once per prompt (the engine computes it on
    # every call, on each lane's last valid token; the extra calls are not counted).
    per_pair = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * lanes
    f_dense_chunk = 2 * counts["non_embedding"] * lanes * chunk
    f_attn_chunk = [per_pair * (chunk * i * chunk + chunk * (chunk + 1) // 2) for i in range(n_chunks)]
    f_dense = f_dense_chunk * n_chunks
    f_attn = sum(f_attn_chunk)
    f_head = 2 * lanes * cfg.d_model * cfg.vocab_size
    flops = f_dense + f_attn + f_head
    achieved = flops / t_prompt / 1e12
    return dict(
        lanes=lanes,
        chunk=chunk,
        plen=plen,
        cache_len=cache_len,
        offsets=[i * chunk for i in range(n_chunks)],
        n_hooks=len(hooks),
        ms=t_prompt * 1e3,
        ms_min=sum(min(t) for t in times) * 1e3,
        ms_max=sum(max(t) for t in times) * 1e3,
        chunk_ms=[t * 1e3 for t in chunk_s],
        chunk_tflops=[(f_dense_chunk + f) / t / 1e12 for f, t in zip(f_attn_chunk, chunk_s)],
        tokens_per_s=n_tok / t_prompt,
        tflop=flops / 1e12,
        tflop_dense=f_dense / 1e12,
        tflop_attn=f_attn / 1e12,
        tflops=achieved,
        mfu_measured=achieved / peaks["matmul_tflops"],
        mfu_nominal=achieved / NOMINAL_BF16_TFLOPS,
        first_s=t_first,
        compile_s=t_first - chunk_s[0],
        xla_backend_compile_s=comp["backend_s"],
        xla_compiles=comp["n"],
    )


# ----------------------------------------------------------------------------- decode


def bench_decode(cfg, params, hooks, counts, peaks, eos_ids, *, slots, plen, new_tokens, seg, reps) -> dict:
    """decode_segment on a pool of `slots` live slots, each `plen` tokens in, `seg` steps per call."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from harvest.engine.decode import decode_segment
    from harvest.engine.generate import GenerateConfig, Generator
    from harvest.engine.sampling import row_keys
    from harvest.engine.state import empty_state

    if (2 + reps) * seg > new_tokens:
        raise ValueError(f"{2 + reps} segments of {seg} steps exceed max_new_tokens={new_tokens}: rows would stop")
    gcfg = GenerateConfig(
        batch_size=min(8, slots),
        decode_slots=slots,
        max_prompt_len=plen,
        max_new_tokens=new_tokens,
        fixed_length=True,
        segment_steps=seg,
        decode_hooks=hooks,
    )
    gen = Generator(cfg, params, gcfg, eos_ids=eos_ids)  # for its DecodeConfig and stop tables
    cache_len = plen + new_tokens
    state = empty_state(cfg, slots, cache_len, new_tokens, hooks, gen.tables.num_strings, params["embed"].dtype)
    state = dataclasses.replace(  # every slot live, as if its plen-token prompt had just been prefilled
        state,
        logits=jax.random.normal(jax.random.key(2), (slots, cfg.vocab_size), jnp.float32),
        length=jnp.full((slots,), plen, jnp.int32),
        active=jnp.ones((slots,), bool),
        keys=row_keys(0, np.arange(slots)),
    )
    jax.block_until_ready(state)

    def call():  # want_free = slots + 1: only max_steps ends the segment
        nonlocal state
        t = time.perf_counter()
        state, steps = decode_segment(cfg, gen.dcfg, params, state, gen.tables, seg, slots + 1)
        jax.block_until_ready((state, steps))
        return time.perf_counter() - t, int(steps)

    c0 = compile_snapshot()
    t_first, n0 = call()
    comp = compile_delta(c0)
    t_second, n1 = call()
    runs = [call() for _ in range(reps)]
    generated = int(state.num_generated.sum())  # the last step may end every row (T reached): fine
    steps_run = {n0, n1, *(n for _, n in runs)}
    if steps_run != {seg} or generated != slots * seg * (2 + reps):
        raise RuntimeError(
            f"rows stopped early: segments ran {sorted(steps_run)} steps, {generated} tokens generated, "
            f"expected {slots * seg * (2 + reps)}"
        )
    per_step = sorted(t / n for t, n in runs)
    step = median(per_step)
    # Bytes read per step: every non-embedding weight, the LM head (= embedding, tied), the embedding
    # rows gathered, and the KV cache. Attention reads all S_max = P + T columns of every slot every step
    # (masked, not skipped), so the whole cache is read each step. Not counted: the [N, V] float32 logits
    # the step writes and the next step reads (sampling, log-softmax), shown separately as logits_gb.
    itemsize = 2
    w_bytes = counts["non_embedding"] * itemsize
    head_bytes = counts["head"] * itemsize
    kv_bytes = 2 * cfg.n_layers * slots * cache_len * cfg.n_kv_heads * cfg.head_dim * itemsize
    emb_bytes = slots * cfg.d_model * itemsize
    step_bytes = w_bytes + head_bytes + kv_bytes + emb_bytes
    logits_bytes = 2 * slots * cfg.vocab_size * 4  # written once, read at least once
    bw = step_bytes / step / 1e12
    return dict(
        slots=slots,
        plen=plen,
        new_tokens=new_tokens,
        cache_len=cache_len,
        segment_steps=seg,
        generated=generated,
        n_hooks=len(hooks),
        ms_per_step=step * 1e3,
        ms_per_step_min=per_step[0] * 1e3,
        tokens_per_s=slots / step,
        bytes_per_step_gb=step_bytes / 1e9,
        weight_gb=(w_bytes + head_bytes) / 1e9,
        kv_gb=kv_bytes / 1e9,
        logits_gb=logits_bytes / 1e9,
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
    if jax.default_backend() == "cpu":  # XLA:CPU cannot donate; the engine donates its state every call
        import warnings

        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
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
            f"  ceilings: bf16 {peaks['matmul_n']}^3 matmul (f32 acc) {g3(peaks['matmul_tflops'])} TFLOP/s "
            f"({peaks['matmul_ms']:.2f} ms; nominal H200 SXM dense bf16 {NOMINAL_BF16_TFLOPS:.0f}); "
            f"D2D copy {peaks['copy_gib']:.2f} GiB via {peaks['copy_how']}: {g3(peaks['copy_tbs'])} TB/s "
            f"read+written ({peaks['copy_ms']:.2f} ms; nominal HBM {NOMINAL_HBM_TBS} TB/s)"
        )
    else:
        print(f"  ceilings (from earlier in this run): matmul {g3(peaks['matmul_tflops'])} TFLOP/s, "
              f"copy {g3(peaks['copy_tbs'])} TB/s")  # fmt: skip

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

    for kind, size in a.plan:
        need = a.need_prefill if kind == "prefill" else a.need_decode
        label = f"R={size[0]} x C={size[1]}" if kind == "prefill" else f"N={size}"
        shape = dict(lanes=size[0], chunk=size[1]) if kind == "prefill" else dict(slots=size)
        if left(a.deadline) < need:
            print(f"  {kind} {label} skipped: {left(a.deadline):.0f} s left")
            emit(results, dict(kind=kind, **base, **shape, skipped=True))
            continue
        try:
            if kind == "prefill":
                r = bench_prefill(
                    cfg, params, hooks, counts, peaks,
                    lanes=size[0], chunk=size[1], plen=a.prefill_len, new_tokens=a.new_tokens, reps=a.reps,
                )  # fmt: skip
                emit(results, dict(kind="prefill", **base, **r))
                per = "/".join(f"{x:.1f}" for x in r["chunk_ms"])
                print(
                    f"  prefill R={r['lanes']:<3} x C={r['chunk']}, P={r['plen']} (offsets "
                    f"{','.join(map(str, r['offsets']))}; cache {r['cache_len']}): {r['ms']:.1f} ms per prompt set "
                    f"(chunks {per} ms; min {r['ms_min']:.1f}, max {r['ms_max']:.1f}), {r['tokens_per_s']:,.0f} "
                    f"tok/s, {g3(r['tflop'])} TFLOP ({g3(r['tflop_dense'])} dense + {g3(r['tflop_attn'])} attention)"
                    f" -> {g3(r['tflops'])} TFLOP/s = MFU {100 * r['mfu_measured']:.1f}% of measured matmul peak, "
                    f"{100 * r['mfu_nominal']:.1f}% of nominal {NOMINAL_BF16_TFLOPS:.0f}; compile "
                    f"{r['compile_s']:.1f} s (first call {r['first_s']:.1f} s; {r['xla_compiles']} XLA compiles, "
                    f"backend {r['xla_backend_compile_s']:.1f} s)"
                )
            else:
                r = bench_decode(
                    cfg, params, hooks, counts, peaks, eos_ids,
                    slots=size, plen=a.decode_prompt, new_tokens=a.new_tokens, seg=a.segment_steps, reps=a.reps,
                )  # fmt: skip
                emit(results, dict(kind="decode", **base, **r))
                print(
                    f"  decode N={r['slots']:<3} P={r['plen']} T={r['new_tokens']} (segments of "
                    f"{r['segment_steps']}): {r['ms_per_step']:.2f} ms/step (min {r['ms_per_step_min']:.2f}), "
                    f"{r['tokens_per_s']:,.0f} tok/s; reads {r['bytes_per_step_gb']:.3f} GB/step "
                    f"(weights+head {r['weight_gb']:.3f}, KV {r['kv_gb']:.3f}; logits {r['logits_gb']:.3f} not "
                    f"counted) -> {g3(r['hbm_tbs'])} TB/s = {100 * r['hbm_util_copy']:.1f}% of measured copy BW, "
                    f"{100 * r['hbm_util_nominal']:.1f}% of nominal; compile {r['compile_s']:.1f} s (first "
                    f"{r['first_s']:.1f} s; {r['xla_compiles']} XLA compiles, backend "
                    f"{r['xla_backend_compile_s']:.1f} s)"
                )
        except Exception as e:  # noqa: BLE001 - report and go on
            emit(results, dict(kind=kind, **base, **shape, error=f"{type(e).__name__}: {e}"[:500]))
            print(f"  {kind} {label} FAILED: {type(e).__name__}: {str(e)[:300]}")
    return 0


# ----------------------------------------------------------------------------- pipeline driver


def cmd_pipeline(a, harvest_args: list[str]) -> int:
    """Run harvest.run.main(harvest_args) with timers around the writer and the reads of finished slots."""
    t_start = time.perf_counter()
    import jax

    _listen_compiles()
    import harvest.cli.pipeline as pl
    from harvest.engine import generate as gen
    from harvest.store.writer import BackgroundWriter

    w = dict(read_s=0.0, reads=0, put_blocked_s=0.0, puts=0, finished_at=[])
    orig_read_slot = gen.read_slot

    def read_slot(state, slot):  # stream device_gets the result: here it is host numpy already
        t0 = time.perf_counter()
        out = jax.device_get(orig_read_slot(state, slot))
        w["read_s"] += time.perf_counter() - t0
        w["reads"] += 1
        return out

    gen.read_slot = read_slot
    orig_stream = gen.Generator.stream

    def stream(self, items):
        for done in orig_stream(self, items):
            w["finished_at"].append(time.perf_counter() - t_start)
            yield done
        w["timings"] = dict(self.timings)

    gen.Generator.stream = stream

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


def _handover_groups(times: list[float], gap: float = 0.05) -> list[tuple[float, int]]:
    """Finished sequences grouped by hand-over time: one group per decode segment, roughly."""
    groups: list[list] = []
    for t in times:
        if groups and t - groups[-1][2] <= gap:
            groups[-1][1] += 1
            groups[-1][2] = t
        else:
            groups.append([t, 1, t])
    return [(g[0], g[1]) for g in groups]


def report_pipeline(results: Path, run_dir: Path, wall: float | None) -> None:
    """Print the pipeline's summary and writer timings (called by gpu.sh after the run)."""
    recs = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
    w = next((r for r in reversed(recs) if r.get("kind") == "pipeline_writer"), None)
    sfile = run_dir / "summary.json"
    out = dict(kind="pipeline", wall_s=wall)
    ss = {}
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
            **{k: ss.get(k) for k in ("prefill_seconds", "decode_seconds", "decode_steps", "prefill_calls")},
            compiles=ss.get("compiles"),
            compile_seconds=ss.get("compile_seconds"),
        )
        print(
            f"  summary.json: {s['sequences']} sequences, {ss['prompt_tokens']:,} prompt + "
            f"{ss['generated_tokens']:,} generated tokens in {ss['seconds']:.1f} s (generation loop, compile included) "
            f"-> session.tokens_per_second {ss['tokens_per_second']:,.1f}; "
            f"{s['bytes_on_disk'] / 2**20:,.1f} MiB on disk, "
            f"compression {s['compression_ratio']:.2f}x"
        )
        if "decode_steps" in ss:
            steps = ss["decode_steps"]
            print(
                f"  engine: prefill {ss['prefill_seconds']:.2f} s in {ss['prefill_calls']} calls "
                f"({ss['prompt_tokens'] / max(ss['prefill_seconds'], 1e-9):,.0f} prompt tok/s), decode "
                f"{ss['decode_seconds']:.2f} s in {steps} steps ({1e3 * ss['decode_seconds'] / max(steps, 1):.2f} "
                f"ms/step, {ss['generated_tokens'] / max(ss['decode_seconds'], 1e-9):,.0f} generated tok/s), both "
                f"with their first call's compile; {ss['compiles']} XLA compiles, {ss['compile_seconds']:.1f} s"
            )
        if wall:
            n = ss["prompt_tokens"] + ss["generated_tokens"]
            print(f"  whole process {wall:.1f} s -> {n / wall:,.0f} tok/s end to end")
    else:
        print(f"  no {sfile} (the run did not finish)")
    if w:
        st = w.get("stats", {})
        busy = st and st["copy_seconds"] + st["write_seconds"]
        loop = (w.get("close_started_at", 0) + w.get("close_s", 0)) - w.get("writer_started_at", 0)
        c = w.get("compile", {})
        out.update(
            writer_loop_s=loop,
            writer_busy_s=busy,
            writer_records_s=st.get("copy_seconds"),
            writer_write_s=st.get("write_seconds"),
            read_slot_s=w["read_s"],
            put_blocked_s=w["put_blocked_s"],
            drain_s=w.get("close_s"),
            xla_compiles=c.get("n"),
            xla_compiles_over_1s=c.get("n_big"),
            xla_backend_compile_s=c.get("backend_s"),
            process_s=w.get("process_s"),
        )
        print(
            f"  XLA (whole process): {c.get('n')} compiles ({c.get('n_big')} over 1 s), backend compile "
            f"{c.get('backend_s', 0):.1f} s, tracing {c.get('trace_s', 0):.1f} s, lowering {c.get('lower_s', 0):.1f} s"
        )
        if st:
            tm = w.get("timings", {})
            other = loop - sum(tm.get(k, 0) for k in ("prefill_seconds", "decode_seconds"))
            other -= w["read_s"] + w["put_blocked_s"]
            print(
                f"  main thread over the generation loop {loop:.1f} s (writer start -> close): prefill "
                f"{tm.get('prefill_seconds', 0):.2f} s, decode {tm.get('decode_seconds', 0):.2f} s, reading "
                f"{w['reads']} finished slots (read_slot + device->host) {w['read_s']:.2f} s, blocked in "
                f"writer.put {w['put_blocked_s']:.2f} s over {w['puts']} puts, rest {other:.2f} s"
            )
            print(
                f"  writer thread: building records {st['copy_seconds']:.2f} s, shard writes "
                f"{st['write_seconds']:.2f} s ({st['shards_written']} shards, {st['bytes_written'] / 2**20:,.1f} MiB, "
                f"{st['bytes_written'] / 2**20 / max(st['write_seconds'], 1e-9):,.0f} MiB/s) -> busy {busy:.2f} s "
                f"= {100 * busy / max(loop, 1e-9):.0f}% of the loop; drain after the last put (close) "
                f"{w.get('close_s', 0):.2f} s"
            )
            groups = _handover_groups(w["finished_at"])
            shown = ", ".join(f"{t:.1f} s x{n}" for t, n in groups[:12]) + (" ..." if len(groups) > 12 else "")
            print(f"  finished sequences handed to the writer at (process time): {shown}")
            last = w["finished_at"][-1] if w["finished_at"] else None
            end = w.get("close_started_at", 0) + w.get("close_s", 0)
            tail = end - last if last is not None else float("nan")
            out["writer_tail_s"] = tail
            print(
                f"  after the last sequence was handed over, the writer needed {tail:.2f} s more "
                f"(records + final shard write): the only wall time the writer adds if it kept up"
            )
            frac = busy / max(loop, 1e-9)
            kept = frac < 0.5 and w["put_blocked_s"] < 0.05 * loop
            print(
                f"  writer kept up: {'YES' if kept else 'NO / marginal'} (busy {100 * frac:.0f}% of the loop; "
                f"put() blocked {w['put_blocked_s']:.2f} s = {100 * w['put_blocked_s'] / max(loop, 1e-9):.0f}%)"
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
            f"{g3(peaks['matmul_tflops'])} TFLOP/s (nominal {NOMINAL_BF16_TFLOPS:.0f}); copy "
            f"{g3(peaks['copy_tbs'])} TB/s (nominal {NOMINAL_HBM_TBS})"
        )
    print(
        f"  {'model':6} {'phase':8} {'shape':>8} {'len':>5} {'ms':>9} {'tok/s':>11} {'util':>7} "
        f"{'compile s':>9} {'compiles':>8}"
    )

    def shape(r):
        return f"{r['lanes']}x{r['chunk']}" if r["kind"] == "prefill" else f"N={r['slots']}"

    def order(r):
        size = r.get("lanes", 0) * r.get("chunk", 0) if r["kind"] == "prefill" else r.get("slots", 0)
        return (r.get("model", ""), r["kind"], size)

    for r in sorted((r for r in recs if r.get("kind") in ("prefill", "decode")), key=order):
        if r.get("error") or r.get("skipped"):
            why = "skipped" if r.get("skipped") else r["error"][:60]
            print(f"  {r['model']:6} {r['kind']:8} {shape(r):>8} {why}")
        elif r["kind"] == "prefill":
            print(
                f"  {r['model']:6} {'prefill':8} {shape(r):>8} {r['plen']:>5} {r['ms']:>9.1f} "
                f"{r['tokens_per_s']:>11,.0f} {100 * r['mfu_measured']:>6.1f}% {r['compile_s']:>9.1f} "
                f"{r['xla_compiles']:>8}   (ms per prompt set; MFU vs measured matmul)"
            )
        else:
            print(
                f"  {r['model']:6} {'decode':8} {shape(r):>8} {r['plen']:>5} {r['ms_per_step']:>9.2f} "
                f"{r['tokens_per_s']:>11,.0f} {100 * r['hbm_util_copy']:>6.1f}% {r['compile_s']:>9.1f} "
                f"{r['xla_compiles']:>8}   (ms/step; HBM vs measured copy)"
            )
    for r in recs:
        if r.get("kind") == "pipeline" and r.get("tokens_per_s") is not None:
            print(
                f"  pipeline: {r['tokens_per_s']:,.1f} tok/s (summary.json, compile included), whole process "
                f"{r['wall_s'] or 0:.1f} s, {r.get('compiles')} compiles / {r.get('compile_seconds') or 0:.1f} s, "
                f"prefill {r.get('prefill_seconds') or 0:.1f} s, decode {r.get('decode_seconds') or 0:.1f} s, "
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
    ap.add_argument("--deadline", type=float, default=None, help="epoch seconds; later items are skipped")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke test")
    ap.add_argument("--model", default="0.5b")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--wall", type=float, default=None)
    a = ap.parse_args(argv)
    # plan: (kind, size) in priority order; prefill size = (lanes, chunk), decode size = decode_slots
    if a.quick:
        a.plan = [("prefill", (4, 64)), ("decode", 4), ("prefill", (2, 64)), ("decode", 2)]
        a.prefill_len, a.new_tokens, a.reps = 256, 16, 2
        a.decode_prompt, a.segment_steps = 64, 4
        a.need_prefill = a.need_decode = 0
    else:
        a.plan = [("prefill", (16, 512)), ("decode", 128), ("decode", 256), ("prefill", (8, 512)), ("decode", 64)]
        a.prefill_len, a.new_tokens, a.reps = 2048, 256, 5
        a.decode_prompt, a.segment_steps = 1024, 32
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
