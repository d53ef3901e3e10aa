"""Every bad input a user can give fails the same way: exit code 2 and one stderr line,
`harvest: error: <message>`, that names the file or key and the fix, and never a traceback.

CASES is the one table of them; docs/RELIABILITY.md lists every row with its message
(test_every_case_is_documented keeps the two in step). Each row builds its bad input in a fresh
folder around a good config (a tiny checkpoint, one local ARC task) and fails before any model runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from harvest.cli.config import from_dict
from harvest.cli.main import main
from helpers.models import saved_hf_model

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "RELIABILITY.md"
GOOD_TASK = {
    "train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}],
    "test": [{"input": [[0, 1]], "output": [[1, 0]]}],
}
UP = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def full_vocab_tiny(tmp_path_factory):
    """A tiny Qwen2 whose vocabulary fits the packaged tokenizer, for the one row that gets past it."""
    pytest.importorskip("torch")
    return saved_hf_model(tmp_path_factory, "bad_inputs_full_vocab", 2, tie=True, vocab_size=151936, hidden_size=16,
                          intermediate_size=32, num_hidden_layers=1)[1]  # fmt: skip


class Inputs:
    """A fresh folder with a good config's parts; rows damage one part and return main()'s argv."""

    def __init__(self, tmp: Path, tiny: Path, request):
        self.tmp, self.tiny, self.request = tmp, tiny, request
        self.arc = tmp / "arc"
        self.arc.mkdir()
        (self.arc / "good.json").write_text(json.dumps(GOOD_TASK))

    def raw(self) -> dict:
        return {
            "model": {"path": str(self.tiny), "dtype": "float32"},
            "data": {"source": "folder", "path": str(self.arc)},
            "capture": {"hooks": ["blocks.0.hook_resid_post"]},
            "runtime": {"progress": False, "compile_cache": None},
            "output": {"path": str(self.tmp / "out")},
        }

    def run(self, *sets: str, **keys) -> list[str]:
        """The good config with `section__key=value` edits, plus `--set` items."""
        raw = self.raw()
        for key, value in keys.items():
            section, name = key.split("__")
            raw.setdefault(section, {})[name] = value
        return self.run_file(yaml.safe_dump(raw), *sets)

    def run_file(self, text: str | bytes, *sets: str) -> list[str]:
        path = self.tmp / "run.yaml"
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return ["run", str(path), *(a for s in sets for a in ("--set", s))]

    def model(self, damage: Callable[[Path], None]) -> list[str]:
        """A copy of the tiny checkpoint, damaged."""
        folder = self.tmp / "model"
        shutil.copytree(self.tiny, folder)
        damage(folder)
        return self.run(model__path=str(folder))

    def task(self, content, **keys) -> list[str]:
        """The ARC folder holding only bad.json."""
        (self.arc / "good.json").unlink()
        (self.arc / "bad.json").write_text(content if isinstance(content, str) else json.dumps(content))
        return self.run(**keys)

    def file(self, name: str) -> Path:
        (self.tmp / name).write_text("not a folder")
        return self.tmp / name

    def folder(self, name: str, *files: str) -> Path:
        (self.tmp / name).mkdir()
        for f in files:
            (self.tmp / name / f).write_text("mine")
        return self.tmp / name


# ------------------------------------------------------------------ damage to a model folder


def edit_config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        edit(cfg)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))

    return damage


def edit_weights(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        edit(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    return damage


def edit_bytes(edit: Callable[[bytes], bytes], name: str = "model.safetensors") -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        (folder / name).write_bytes(edit((folder / name).read_bytes()))

    return damage


def remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def rename(name: str, to: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).rename(folder / to)


def cut(n: int) -> Callable[[bytes], bytes]:
    return lambda data: data[:n]


def drop(tensor: str) -> Callable[[dict], None]:
    return lambda tensors: tensors.pop(tensor)


def grid(g) -> dict:
    return {"train": [{"input": g, "output": [[1]]}], "test": [{"input": [[1]]}]}


def changed_run(w: Inputs) -> list[str]:
    """A run folder whose run.json was harvested with generation.max_new_tokens 300; now 200."""
    argv = w.run(model__path=str(w.request.getfixturevalue("full_vocab_tiny")), generation__max_new_tokens=200)
    stored = from_dict(yaml.safe_load(Path(argv[1]).read_text())).to_dict()
    stored["generation"]["max_new_tokens"] = 300
    (w.tmp / "out").mkdir()
    (w.tmp / "out" / "run.json").write_text(json.dumps({"config": stored}))
    return argv


def read_only_parent(w: Inputs) -> list[str]:
    (w.tmp / "ro").mkdir()
    (w.tmp / "ro").chmod(0o555)
    return w.run(output__path=str(w.tmp / "ro" / "run"))


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    input: str  # the bad input, in words (docs/RELIABILITY.md)
    build: Callable[[Inputs], list[str]]  # makes it under Inputs.tmp; returns main()'s argv
    message: str  # the whole line after "harvest: error: "; {tmp} is the row's folder, <*> any text
    root_skips: bool = False  # a permission fault: root reads and writes anyway

    def pattern(self, tmp: Path) -> re.Pattern:
        parts = self.message.split("<*>")
        return re.compile(".*?".join(re.escape(p.replace("{tmp}", str(tmp))) for p in parts))

    def shown(self) -> str:
        """The message as docs/RELIABILITY.md shows it."""
        return self.message.replace("{tmp}/", "…/").replace("<*>", "…")


CASES = [
    # ---- the config file and --set
    Case("config_missing", "config file that does not exist", lambda w: ["run", str(w.tmp / "nope.yaml")],
         "config file '{tmp}/nope.yaml' does not exist; give a YAML run config (see configs/demo.yaml)"),
    Case("yaml_syntax", "YAML syntax error in the config file",
         lambda w: w.run_file("model:\n  path: random:tiny\n  dtype: a: b\n"),
         "{tmp}/run.yaml:3:11: not valid YAML: mapping values are not allowed here"),
    Case("yaml_not_utf8", "config file that is not UTF-8", lambda w: w.run_file(b"model:\n  path: \xff\n"),
         "{tmp}/run.yaml: not UTF-8 text (byte 15); save the config as UTF-8"),
    Case("yaml_not_mapping", "config that is a list, not sections", lambda w: w.run_file("- model\n- data\n"),
         "{tmp}/run.yaml: expected a mapping of sections (model, data, prompt, ...), got a list"),
    Case("unknown_section", "misspelt section", lambda w: w.run(modle__path="x"),
         "unknown section 'modle'; sections are model, data, prompt, augment, generation, capture, runtime, output"),
    Case("section_not_mapping", "section given a value instead of keys", lambda w: w.run_file("model: random:tiny\n"),
         "model: expected a mapping of keys, got str 'random:tiny'"),
    Case("unknown_key", "misspelt key", lambda w: w.run(capture__bogus=1),
         "unknown key 'capture.bogus'; capture has hooks, phases, dtype, codec, shard_mb, min_shared_prefix"),
    Case("wrong_type", "a word where a number belongs", lambda w: w.run(runtime__batch_size="two"),
         "runtime.batch_size: expected int, got str 'two'"),
    Case("not_a_choice", "a value outside the key's choices", lambda w: w.run(model__dtype="float8"),
         "model.dtype: 'float8' is not one of float32, bfloat16, float16"),
    Case("impossible_value", "an impossible number", lambda w: w.run(generation__top_p=0),
         "generation.top_p: 0 is impossible; it must be in (0, 1]"),
    Case("renamed_key", "a key under its old name", lambda w: w.run(generation__ignore_eos=True),
         "generation.ignore_eos was renamed generation.fixed_length; rename the key"),
    Case("removed_key", "a removed key", lambda w: w.run(runtime__buckets=[64]),
         "runtime.buckets was removed (prompts are prefilled in chunks of runtime.prefill_chunk tokens, whatever "
         "their length); delete the key"),
    Case("task_id_as_number", "an unquoted task id that YAML reads as a number",
         lambda w: w.run("data.tasks=[00576224]"),
         "data.tasks[0]: expected str, got int 195732 (quote it: YAML reads 00576224 as a number)"),
    Case("data_path_missing", "data.source folder without data.path", lambda w: w.run(data__path=None),
         "data.path is required when data.source is 'folder'"),
    Case("set_without_value", "--set without =", lambda w: w.run("generation.top_k"),
         "--set 'generation.top_k': expected dotted.key=value"),
    Case("set_without_section", "--set key without its section", lambda w: w.run("top_k=5"),
         "--set 'top_k': expected section.key"),
    Case("set_bad_yaml", "--set value that is not YAML", lambda w: w.run("data.tasks=[a"),
         "--set data.tasks: cannot parse '[a' as YAML at column 3: expected ',' or ']', but got '<stream end>'"),
    Case("unknown_hook_layer", "a hook past the model's last layer",
         lambda w: w.run(capture__hooks=["blocks.9.hook_resid_post"]),
         "hook 'blocks.9.hook_resid_post': layer 9 does not exist; valid layers are 0-2"),
    # ---- the model
    Case("model_missing", "model path that does not exist and is not a hub id",
         lambda w: w.run(model__path=str(w.tmp / "nope")),
         "model path '{tmp}/nope' does not exist (give a folder, a .gguf file, a hub id or random:tiny)"),
    Case("model_is_a_file", "model path that is a file", lambda w: w.run(model__path=str(w.file("model.txt"))),
         "model path '{tmp}/model.txt' is a file; give a folder with config.json, or a .gguf file"),
    Case("model_no_config", "model folder without config.json", lambda w: w.model(remove("config.json")),
         "no config.json in {tmp}/model; give a Hugging Face model folder (config.json + *.safetensors)"),
    Case("model_config_truncated", "truncated config.json", lambda w: w.model(edit_bytes(cut(200), "config.json")),
         "{tmp}/model/config.json:11:3: not valid JSON (Unterminated string starting at); download the model again"),
    Case("model_config_lacks_key", "config.json without hidden_size",
         lambda w: w.model(edit_config(lambda c: c.pop("hidden_size"))),
         "{tmp}/model/config.json lacks 'hidden_size', which every Qwen2 config.json has; download it again"),
    Case("model_not_qwen2", "config.json of another architecture (Llama)",
         lambda w: w.model(edit_config(lambda c: c.update(model_type="llama", architectures=["LlamaForCausalLM"]))),
         "{tmp}/model/config.json: model_type 'llama' (LlamaForCausalLM) is not Qwen2; harvest loads "
         "Qwen2ForCausalLM checkpoints only"),
    Case("model_remote_code", "config.json that needs custom code (auto_map)",
         lambda w: w.model(edit_config(lambda c: c.update(auto_map={"AutoModelForCausalLM": "x.X"}))),
         "{tmp}/model needs custom code (auto_map); harvest never runs trust_remote_code and supports "
         "Qwen2ForCausalLM only"),
    Case("model_no_weights", "model folder without weight files", lambda w: w.model(remove("model.safetensors")),
         "no *.safetensors weights in {tmp}/model; download the checkpoint's .safetensors files into it"),
    Case("model_pickle_weights", "only pickle (.bin) weights",
         lambda w: w.model(rename("model.safetensors", "pytorch_model.bin")),
         "{tmp}/model has only pickle weights (.bin/.pt), which harvest refuses to load; convert them to "
         "safetensors first"),
    Case("model_truncated_weights", "truncated safetensors file (an interrupted download)",
         lambda w: w.model(edit_bytes(lambda b: b[: len(b) // 2])),
         "{tmp}/model/model.safetensors is not a readable safetensors file: tensor <*> has data offsets <*> "
         "outside its <*> data bytes (truncated?); download it again"),
    Case("model_garbled_header", "garbled safetensors header",
         lambda w: w.model(edit_bytes(lambda b: b[:8] + b"\xff" * 16 + b[24:])),
         "{tmp}/model/model.safetensors is not a readable safetensors file: its header is garbled (byte 0xff at "
         "offset 8 is not UTF-8); download it again"),
    Case("model_missing_tensor", "a tensor missing from the weights", lambda w: w.model(edit_weights(drop(UP))),
         "{tmp}/model/model.safetensors: checkpoint has no tensor 'model.layers.1.mlp.up_proj.weight', which "
         "config.json implies; the weights are incomplete or belong to another model"),
    Case("model_wrong_shape", "a tensor whose shape is not what config.json implies",
         lambda w: w.model(edit_weights(lambda t: t.__setitem__(UP, t[UP][:-1]))),
         "{tmp}/model/model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' has shape (159, 64), "
         "config.json implies (160, 64); config.json and the weights belong to different models"),
    Case("model_int_weights", "integer (quantized) weights",
         lambda w: w.model(edit_weights(lambda t: t.__setitem__(UP, t[UP].astype(np.int8)))),
         "{tmp}/model/model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' has unsupported dtype I8; "
         "harvest loads float weights (F64, F32, F16, BF16), not quantized ones"),
    Case("model_no_tokenizer", "no tokenizer, and the packaged Qwen2 one does not fit the vocabulary",
         lambda w: w.model(lambda folder: None),
         "{tmp}/model has no tokenizer (tokenizer.json or vocab.json), and the packaged Qwen2 tokenizer's 151936 "
         "tokens do not fit its vocab_size 512; copy the checkpoint's tokenizer files into it"),
    # ---- the ARC data
    Case("arc_folder_missing", "data.path folder that does not exist", lambda w: w.run(data__path=str(w.tmp / "nope")),
         "ARC task folder {tmp}/nope does not exist; give a folder of task .json files"),
    Case("arc_folder_empty", "data.path folder without .json tasks", lambda w: w.run(data__path=str(w.folder("empty"))),
         "ARC task folder {tmp}/empty holds no .json task files; give a folder of task .json files"),
    Case("arc_not_json", "task file that is not JSON", lambda w: w.task('{"train": [\n  [1, 2\n]}'),
         "no usable ARC tasks in {tmp}/arc: 1 skipped, first {tmp}/arc/bad.json:3:2: not valid JSON (Expecting "
         "',' delimiter); fix or remove the bad tasks"),
    Case("arc_missing_test", 'task without "test"', lambda w: w.task({"train": GOOD_TASK["train"]}),
         "no usable ARC tasks in {tmp}/arc: 1 skipped, first {tmp}/arc/bad.json: missing key 'test' (a task needs "
         "'train' and 'test' lists of input/output pairs); fix or remove the bad tasks"),
    Case("arc_ragged_grid", "grid whose rows differ in length", lambda w: w.task(grid([[1, 2], [3]])),
         "no usable ARC tasks in {tmp}/arc: 1 skipped, first {tmp}/arc/bad.json: train[0].input: row 1 has 1 "
         "cells, row 0 has 2; fix or remove the bad tasks"),
    Case("arc_bad_colour", "grid cell that is not an integer 0-9", lambda w: w.task(grid([[1, 10]])),
         "no usable ARC tasks in {tmp}/arc: 1 skipped, first {tmp}/arc/bad.json: train[0].input: cell (0,1) = 10 "
         "is not an integer 0..9; fix or remove the bad tasks"),
    Case("arc_unknown_ids", "data.tasks naming ids that do not exist", lambda w: w.run(data__tasks=["nope"]),
         "unknown ARC task ids in {tmp}/arc: nope; give ids that exist there (e.g. good)"),
    # ---- the output folder
    Case("output_is_a_file", "output.path that is a file", lambda w: w.run(output__path=str(w.file("out.txt"))),
         "output.path '{tmp}/out.txt' is a file"),
    Case("output_under_a_file", "output.path under a regular file",
         lambda w: w.run(output__path=str(w.file("out.txt") / "run")),
         "output.path '{tmp}/out.txt/run' lies under the file '{tmp}/out.txt'; choose another path"),
    Case("output_not_a_run", "output.path that is an existing folder, not a harvest run",
         lambda w: w.run(output__path=str(w.folder("mine", "notes.txt"))),
         "{tmp}/mine exists and is not a harvest run folder; harvest will neither write into nor delete it "
         "(--overwrite included): choose another output.path"),
    Case("output_not_writable", "output.path under a read-only folder (skipped as root)", read_only_parent,
         "output.path '{tmp}/ro/run': '{tmp}/ro' is not writable; choose another path", root_skips=True),
    Case("resume_changed_config", "resuming a run with a changed data key", changed_run,
         "{tmp}/out holds a run with a different config (generation.max_new_tokens: 300 -> 200); use another "
         "output.path or --overwrite"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_with_one_line(case, tmp_path, hf_tiny, request, capsys):
    if case.root_skips and os.geteuid() == 0:
        pytest.skip("running as root, which reads and writes regardless of permissions")
    argv = case.build(Inputs(tmp_path, hf_tiny[1], request))
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("harvest: error: "), err
    assert case.pattern(tmp_path).fullmatch(err.removeprefix("harvest: error: ").removesuffix("\n")), err


def test_the_table_covers_every_kind_of_bad_input():
    assert len(CASES) >= 28 and len({c.id for c in CASES}) == len(CASES)
    for kind in ("config_", "yaml_", "set_", "model_", "arc_", "output_"):
        assert any(c.id.startswith(kind) for c in CASES), kind


def test_every_case_is_documented():
    """docs/RELIABILITY.md has a row per case: its id and its message as the user reads it."""
    doc = DOC.read_text()
    section = doc.split("## Bad inputs", 1)[1].split("\n## ", 1)[0]
    rows = {m[1]: line for line in section.splitlines() if (m := re.match(r"\| `(\w+)`", line))}
    missing = [c.id for c in CASES if c.id not in rows]
    assert not missing, f"{DOC.relative_to(ROOT)} lacks rows for {missing}"
    stale = [c.id for c in CASES if f"`{c.shown()}`" not in rows[c.id]]
    assert not stale, f"{DOC.relative_to(ROOT)} shows another message for {stale}"
    extra = sorted(rows.keys() - {c.id for c in CASES})
    assert not extra, f"{DOC.relative_to(ROOT)} documents cases the test no longer has: {extra}"
