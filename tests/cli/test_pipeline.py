"""End to end: `python -m harvest.run` stores exactly the model's activations, resumes safely."""

import json
import re

import numpy as np
import pytest
import yaml
import zarr

from harvest.cli.config import from_dict
from harvest.data import open_store
from harvest.run import main
from harvest.run import run as run_harvest
from helpers.models import hf_forward
from helpers.runs import HOOKS, ROOT, SHORT_TASKS, run_config


def test_stored_activations_equal_transformers(real_vocab_model, tmp_path):
    model, folder = real_vocab_model
    summary = run_harvest(from_dict(run_config(folder, tmp_path / "run")))
    store = open_store(tmp_path / "run")
    assert store.num_sequences == summary["sequences"] >= 2
    assert summary["session"]["pool_slots"] == store.num_sequences  # not runtime.decode_slots' 32: no empty slots
    assert sorted(store.hooks) == sorted(HOOKS)
    for sid in store.sequences["sequence_id"]:
        seq = store.sequence(int(sid))
        ids = seq["token_id"]
        assert np.array_equal(seq["position"], np.arange(len(ids)))  # prefill then decode, no padding
        n_decode = int((seq["phase"] == 1).sum())
        assert n_decode == 6
        out, caught = hf_forward(model, ids)
        for name in HOOKS:
            if name.endswith("resid_pre"):
                ref = out.hidden_states[int(name.split(".")[1])][0].numpy()
            elif name.endswith("resid_post"):
                ref = out.hidden_states[int(name.split(".")[1]) + 1][0].numpy()
            elif name.endswith("resid_mid"):
                layer = int(name.split(".")[1])
                ref = out.hidden_states[layer][0].numpy() + caught[f"blocks.{layer}.hook_attn_out"]
            else:
                ref = caught[name]
            np.testing.assert_allclose(seq[name], ref, atol=1e-4, rtol=0, err_msg=name)
    # Per-token labels: the test input's cells are labelled, the answer tokens are the decode phase.
    toks = {k: store.tokens(k) for k in ("segment", "row", "col", "phase")}
    assert ((toks["segment"] == 3) & (toks["row"] >= 0)).any()
    assert (toks["segment"][toks["phase"] == 1] == 4).all()
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    for key in ("config", "model", "dataset", "packages", "git_commit", "machine", "started", "finished"):
        assert key in meta
    assert len(meta["model"]["weights_sha256"]) == 64 and len(meta["model"]["tokenizer_sha256"]) == 64


def test_changed_config_is_refused_and_overwrite_starts_over(real_vocab_model, tmp_path):
    _, folder = real_vocab_model
    raw = run_config(folder, tmp_path / "run", data__limit=1)
    run_harvest(from_dict(raw))
    changed = run_config(
        folder, tmp_path / "run", data__limit=1, generation__max_new_tokens=7, capture__dtype="bfloat16"
    )
    diff = "capture.dtype: 'float32' -> 'bfloat16', generation.max_new_tokens: 6 -> 7"
    with pytest.raises(ValueError, match=f"different config \\({re.escape(diff)}\\)"):
        run_harvest(from_dict(changed))
    # keys that do not change the data (codec, shard size, every runtime key) may change on resume
    same = dict(data__limit=1, capture__codec="zstd", runtime__queue=3, runtime__batch_size=1, runtime__decode_slots=2)
    same["runtime__mesh"] = {"data": 1}  # a nested runtime key is a runtime key too
    run_harvest(from_dict(run_config(folder, tmp_path / "run", **same)))
    s = run_harvest(from_dict(changed), overwrite=True)
    assert s["sequences"] == 1 and open_store(tmp_path / "run").storage_dtype == "bfloat16"


@pytest.mark.parametrize(
    "override, message",
    [
        ("generation.top_p=0", "generation.top_p: 0 is impossible"),
        ("capture.bogus=1", "unknown key 'capture.bogus'"),
        ("runtime.batch_size=two", "runtime.batch_size: expected int"),
        ("capture.hooks=[blocks.9.hook_resid_post]", "layer 9 does not exist"),
        ("model.path=/nonexistent/model", "does not exist"),
        ("model.dtype=float8", "model.dtype: 'float8' is not one of"),
        ("data.source=folder", "data.path is required"),
        ("data.tasks=[not-a-task]", "not-a-task"),
        ("runtime.max_capture_gb=0.001", "KV cache and capture buffers need about"),
        ("runtime.prefill_chunk=768", "runtime.prefill_chunk: 768 is impossible; it must be a power of two"),
        ("runtime.decode_slots=4", "runtime.decode_slots: 4 is below batch_size=8"),
        ("runtime.buckets=[64]", "runtime.buckets was removed"),
        ("generation.stop_strings=['']", "non-empty strings"),
        ("generation.seed=-1", "generation.seed: -1 is impossible"),
        ("capture.phases=[prefill, prefill]", "no repeats"),
        ("runtime.mesh={data: 0}", "runtime.mesh.data: 0 is impossible"),
        ("runtime.mesh={data: 2}", "runtime.mesh: {'data': 2, 'model': 1} needs 2 devices, this process has 1"),
        ("runtime.mesh={rows: 2}", "runtime.mesh: axes are data and model"),
    ],
)
def test_cli_rejects_bad_config_with_one_line(override, message, tmp_path, capsys):
    cfg_file = ROOT / "configs" / "demo.yaml"
    code = main([str(cfg_file), "--set", override, "--set", f"output.path={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err and "Traceback" not in err


def test_store_opens_with_plain_zarr(real_vocab_model, tmp_path):
    _, folder = real_vocab_model
    run_harvest(from_dict(run_config(folder, tmp_path / "run", data__limit=1)))
    shard = sorted((tmp_path / "run" / "shards").iterdir())[0]
    g = zarr.open_group(shard, mode="r")
    assert g["token_id"].shape[0] == open_store(tmp_path / "run").num_tokens


def test_output_folder_guards(real_vocab_model, tmp_path):
    from harvest.store.runfolder import StoreError, lock_run

    _, folder = real_vocab_model
    cfg = from_dict(run_config(folder, tmp_path / "run", data__limit=1))
    with lock_run(tmp_path / "run"):  # another live harvest holds the folder
        with pytest.raises(StoreError, match="in use by another harvest"):
            run_harvest(cfg)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # never written into, never deleted, no lock file left behind
        with pytest.raises(ValueError, match="not a harvest run folder"):
            run_harvest(from_dict(run_config(folder, tmp_path / "other", data__limit=1)), overwrite=overwrite)
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]


def test_overwrite_checks_every_input_before_deleting(real_vocab_model, tmp_path, monkeypatch):
    _, folder = real_vocab_model
    run_harvest(from_dict(run_config(folder, tmp_path / "run", data__limit=1)))
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "run").rglob("*"))
    bad = [("model__path", str(tmp_path / "typo"), "does not exist"),
           ("capture__hooks", ["blocks.9.hook_resid_post"], "layer 9 does not exist"),
           ("data__tasks", ["not-a-task"], "not-a-task")]  # fmt: skip
    for key, value, message in bad:
        with pytest.raises(ValueError, match=message):
            run_harvest(from_dict(run_config(folder, tmp_path / "run", data__limit=1, **{key: value})), overwrite=True)
        assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "run").rglob("*")) == before
    # an output path under a file, and ~ expanded (never a literal folder named "~")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="lies under the file"):
        run_harvest(from_dict(run_config(folder, tmp_path / "file" / "run", data__limit=1)))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = from_dict(run_config(folder, "~/runs/x", data__limit=1))
    assert cfg.output.path == str(tmp_path / "home" / "runs" / "x")
    run_harvest(cfg)
    assert open_store(tmp_path / "home" / "runs" / "x").num_sequences == 1 and not (tmp_path / "~").exists()


def test_resume_refuses_changed_tasks(real_vocab_model, tmp_path):
    """Sequence ids are positions in the task list: a task added before resuming must be refused."""
    from harvest import arc

    _, folder = real_vocab_model
    tasks, _ = arc.load_tasks("arc-agi-1", "evaluation", task_ids=SHORT_TASKS[:3], seed=None)
    src = tmp_path / "tasks"
    src.mkdir()

    def save(t):
        as_list = lambda pairs: [{"input": i.tolist(), "output": o.tolist()} for i, o in pairs]  # noqa: E731
        (src / f"{t.id}.json").write_text(json.dumps({"train": as_list(t.train), "test": as_list(t.test)}))

    for t in tasks[1:]:
        save(t)
    raw = run_config(folder, tmp_path / "run", data__source="folder", data__path=str(src), data__limit=None)
    raw["data"].pop("tasks")
    run_harvest(from_dict(raw))
    save(tasks[0])
    with pytest.raises(ValueError, match=r"other inputs \(sequences changed"):
        run_harvest(from_dict(raw))


def test_prefill_only_run_equals_a_full_runs_prompt_rows(real_vocab_model, tmp_path, capsys):
    """generation.max_new_tokens 0 with capture.phases [prefill]: the stored rows equal the prompt rows
    of a run that generates; answers are marked as not generated, and nothing is scored."""
    _, folder = real_vocab_model
    hooks = ["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post"]  # of 5 layers: the run stops after layer 1
    full = run_harvest(from_dict(run_config(folder, tmp_path / "full", capture__hooks=hooks)))
    raw = run_config(
        folder, tmp_path / "only", capture__hooks=hooks, capture__phases=["prefill"], generation__max_new_tokens=0
    )
    summary = run_harvest(from_dict(raw))
    assert summary["arc"] is None and summary["tokens_per_phase"]["decode"] == 0
    assert summary["session"]["decode_steps"] == 0 and full["session"]["decode_steps"] > 0
    a, b = open_store(tmp_path / "full"), open_store(tmp_path / "only")
    assert b.num_sequences == a.num_sequences
    for sid in a.sequences["sequence_id"]:
        x, y = a.sequence(int(sid)), b.sequence(int(sid))
        prompt = x["phase"] == 0
        np.testing.assert_array_equal(y["token_id"], x["token_id"][prompt])
        for h in hooks:
            np.testing.assert_allclose(y[h], x[h][prompt], atol=1e-6, rtol=0, err_msg=h)
    t = b.sequences
    assert (t["generated_length"] == 0).all() and set(t["stop_reason"]) == {"none"}
    assert set(t["generated_text"]) == {""} and np.isnan(t["pixel_accuracy"]).all() and (t["pred_h"] == -1).all()
    cfg = tmp_path / "only.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main([str(cfg)]) == 0  # a no-op resume prints the report
    assert "answers: not generated (prefill-only run)" in capsys.readouterr().out
    raw["capture"]["phases"] = ["prefill", "decode"]
    with pytest.raises(ValueError, match="capture.phases: 'decode' needs answers"):
        from_dict(raw)
