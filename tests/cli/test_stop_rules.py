"""Runs stop on the real rules with the real tokenizer: a blank line or "Input" after a base prompt's
grid, <|im_end|> after a chat answer; fixed_length ignores them all."""

import json

import pytest

from harvest.data import open_store
from harvest.run import main
from helpers.scripted import scripted_checkpoint

# Real Qwen2 ids: ":\n" ends every base prompt, "\n" ends the chat template's assistant header.
COLON_NL, NL, ONE, TWO, THREE, FOUR, BLANK, INPUT, IM_END = 510, 198, 16, 17, 18, 19, 271, 2505, 151645
CONFIG = "configs/demo.yaml"
MAX_NEW = 12


def harvest(tmp_path, chain, *overrides, eos=151643):
    model = scripted_checkpoint(tmp_path / "model", chain, eos=eos)
    args = [CONFIG, "--set", f"model.path={model}", "--set", "model.dtype=float32", "--set", "data.limit=2",
            "--set", f"generation.max_new_tokens={MAX_NEW}", "--set", "capture.hooks=[blocks.0.hook_resid_post]",
            "--set", f"output.path={tmp_path / 'run'}", "--set", "runtime.compile_cache=null",
            "--set", "runtime.progress=false", *[a for o in overrides for a in ("--set", o)]]  # fmt: skip
    assert main(args) == 0
    store = open_store(tmp_path / "run")
    table = store.sequences
    return store, [
        {
            k: table[k][i]
            for k in ("stop_reason", "generated_text", "generated_length", "chat", "parsed_ok", "pred_h", "pred_w")
        }
        for i in range(len(table))
    ]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def test_base_prompt_stops_at_the_blank_line(tmp_path):
    # after the prompt: "12\n34\n\nInput:\n12..." forever, unless the blank line stops it
    store, rows = harvest(tmp_path, [COLON_NL, ONE, TWO, NL, THREE, FOUR, BLANK, INPUT, COLON_NL])
    for r in rows:
        assert (r["stop_reason"], r["generated_text"], r["chat"]) == ("stop_string", "12\n34\n\n", False)
        assert r["parsed_ok"] and (r["pred_h"], r["pred_w"]) == (2, 2)
    seq = store.sequence(int(store.sequences["sequence_id"][0]))
    assert seq["token_id"][seq["phase"] == 1].tolist() == [ONE, TWO, NL, THREE, FOUR, BLANK]  # the stop token is kept


def test_base_prompt_stops_at_input(tmp_path):
    _, rows = harvest(tmp_path, [COLON_NL, ONE, TWO, NL, INPUT, COLON_NL])
    assert {(r["stop_reason"], r["generated_text"]) for r in rows} == {("stop_string", "12\nInput")}


def test_chat_answer_stops_at_im_end(tmp_path):
    # an instruct config (eos <|im_end|>) gets the chat template on chat: auto, and no stop strings
    _, rows = harvest(tmp_path, [NL, ONE, TWO, IM_END], eos=IM_END)
    for r in rows:
        assert (r["stop_reason"], r["generated_text"], r["chat"], r["generated_length"]) == ("eos", "12", True, 3)


def test_fixed_length_ignores_every_stop_rule(tmp_path):
    _, rows = harvest(
        tmp_path, [COLON_NL, ONE, TWO, NL, THREE, FOUR, BLANK, INPUT, COLON_NL], "generation.fixed_length=true"
    )
    for r in rows:
        assert (r["stop_reason"], r["generated_length"]) == ("max_new_tokens", MAX_NEW)
        assert r["generated_text"].startswith("12\n34\n\nInput:\n12")


def test_stop_reasons_are_recorded_in_run_json(tmp_path):
    harvest(tmp_path, [NL, ONE, TWO, IM_END], eos=IM_END)
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert set(meta["stop_reasons"].values()) == {"none", "eos", "stop_string", "max_new_tokens"}
