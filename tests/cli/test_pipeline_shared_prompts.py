"""Shared prompt prefixes in a whole harvest: samples of one prompt and the test inputs of one task are
prefilled once and their shared prompt rows stored once, yet every sequence reads back whole and equal
to a run that shares nothing; a harvest killed mid-run resumes to the same store."""

import numpy as np
import yaml

from harvest.cli.config import from_dict
from harvest.cli.main import main
from harvest.cli.records import shared_prompts
from harvest.data import open_store
from harvest.run import run as run_harvest
from helpers.runs import assert_same_run, harvest_process, run_config

TASKS = ["6ea4a07e", "66e6c45b"]  # the first has two test inputs: 2 x 3 samples + 3 samples
MIN_SHARED = 24  # below the base prompts' common header: different tasks share it too


def config(folder, out, **over):
    base = dict(
        data__tasks=TASKS,
        data__limit=2,
        generation__samples=3,
        generation__temperature=1.5,
        capture__min_shared_prefix=MIN_SHARED,
        runtime__prefill_chunk=16,
        runtime__decode_slots=4,
    )
    return run_config(folder, out, **{**base, **over})


def expected_stored_prompt_rows(prompts: dict) -> int:
    """Brute force: each prompt stores the rows past its longest common prefix with any earlier one."""
    total = 0
    for sid, p in prompts.items():
        best = 0
        for other, q in prompts.items():
            if other < sid:
                m = min(len(p), len(q))
                same = np.flatnonzero(p[:m] != q[:m])
                best = max(best, int(same[0]) if len(same) else m)
        total += len(p) - (best if best >= MIN_SHARED else 0)
    return total


def test_sharing_stores_each_prompt_row_once_and_changes_no_sequence(real_vocab_model, tmp_path):
    _, folder = real_vocab_model
    plain = run_harvest(from_dict(config(folder, tmp_path / "plain", capture__min_shared_prefix=0)))
    shared = run_harvest(from_dict(config(folder, tmp_path / "shared")))
    a, b = open_store(tmp_path / "plain"), open_store(tmp_path / "shared")
    assert a.num_sequences == b.num_sequences == 9
    assert plain["session"]["shared_prompt_tokens"] == 0 < shared["session"]["shared_prompt_tokens"]
    t = b.sequences
    prompts = {}
    for sid in t["sequence_id"]:
        x, y = a.sequence(int(sid)), b.sequence(int(sid))  # y: whole, its shared rows read from its donor
        assert x.keys() == y.keys()
        for k in x:
            if k in a.hooks:
                np.testing.assert_allclose(y[k], x[k], atol=1e-5, rtol=0, err_msg=f"sequence {sid}: {k}")
            else:
                np.testing.assert_array_equal(y[k], x[k], err_msg=f"sequence {sid}: {k}")
        prompts[int(sid)] = x["token_id"][x["phase"] == 0]
    # the samples drew different answers, so sharing did not make them copies
    answers = {tuple(a.sequence(int(s))["token_id"][a.sequence(int(s))["phase"] == 1]) for s in t["sequence_id"]}
    assert len(answers) > 3
    stored_prompt_rows = int((b.tokens("phase") == 0).sum())
    assert stored_prompt_rows == expected_stored_prompt_rows(prompts) < int((a.tokens("phase") == 0).sum())
    plan = shared_prompts(prompts, MIN_SHARED)
    assert {
        int(s): (int(d), int(p))
        for s, d, p in zip(t["sequence_id"], t["prompt_sequence_id"], t["shared_prompt_length"])
        if p > 0
    } == plan
    assert len({p for _, p in plan.values()}) > 2  # identical prompts, a shared task, a shared header
    assert main(["verify", str(tmp_path / "shared"), "--deep"]) == 0


def test_killed_mid_run_resumes_to_the_same_store(real_vocab_model, tmp_path):
    _, folder = real_vocab_model
    # tail_slots 0: a row decoded in the small tail pool runs another compiled program, whose float rounding
    # may differ in the last bit (docs/FORMAT.md, "Runtime settings and bits"); the fault suite runs so too
    over = dict(capture__shard_mb=0.001, capture__dtype="bfloat16", runtime__compile_cache=str(tmp_path / "xla"))
    over |= dict(runtime__tail_slots=0)
    run_harvest(from_dict(config(folder, tmp_path / "reference", **over)))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(config(folder, tmp_path / "run", **over)))
    proc = harvest_process(["run", str(cfg)], env={"HARVEST_FAILPOINT": "shard.built@4"})
    assert proc.returncode == -9, proc.stdout[-3000:]
    assert open_store(tmp_path / "run").num_sequences == 3  # one sequence per shard
    assert main(["run", str(cfg)]) == 0
    assert_same_run(open_store(tmp_path / "run"), open_store(tmp_path / "reference"))
