"""The documentation runs: every ```python snippet of README.md and docs/*.md executes against a demo
store, and every harvest command of a ```bash block names a config file that loads.

Snippets of one file run in order in one namespace (later snippets use earlier names), with the
working directory set to a folder holding `outputs/demo`, the store `python -m harvest.run
configs/demo.yaml` writes (built once per session, with fewer tasks). A snippet that cannot run here
is marked in the markdown, visibly, by the line just before its fence:

    <!-- not run: why (e.g. needs the Hugging Face hub) -->

Keep such exceptions rare; the reason is required.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
# The demo config as documented, smaller: the first 6 of its 20 tasks (same order, same sequence ids),
# over 4096 token rows, so that the docs' loops over 4096-row batches with drop_last=True run too.
DEMO_OVERRIDES = ["data.limit=6", "runtime.progress=false", "runtime.compile_cache=null"]
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(?P<reason>.*?)\s*-->$")


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the block's first code line in the markdown file
    lang: str
    code: str
    not_run: str | None  # the reason given by a `<!-- not run: ... -->` line before the fence

    @property
    def where(self) -> str:
        first = next((s.strip() for s in self.code.splitlines() if s.strip()), "")
        return f"{self.path.relative_to(ROOT)}:{self.line} (snippet starting `{first}`)"


def fenced_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```\s*([\w+-]*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start = i + 1
        end = next((j for j in range(start, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{path.relative_to(ROOT)}:{i + 1}: unclosed code fence"
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = NOT_RUN.match(before)
        out.append(Block(path, start + 1, m[1].lower(), "\n".join(lines[start:end]) + "\n", mark and mark["reason"]))
        i = end + 1
    return out


def blocks_of(lang: str) -> list[Block]:
    return [b for p in DOCS for b in fenced_blocks(p) if b.lang == lang]


def files_with(lang: str) -> list[Path]:
    return sorted({b.path for b in blocks_of(lang)})


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A folder holding outputs/demo, written by the documented command (a smaller demo)."""
    cwd = tmp_path_factory.mktemp("docs")
    cmd = [sys.executable, "-m", "harvest.run", str(DEMO_CONFIG)]
    for o in DEMO_OVERRIDES:
        cmd += ["--set", o]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    from harvest.data import open_store

    assert open_store(cwd / "outputs" / "demo").num_tokens > 4096 + 6  # 6 attention-sink rows are masked
    return cwd


def test_docs_have_snippets():
    assert len(DOCS) >= 4, DOCS  # README plus docs/FORMAT, ARC, TRAINING
    assert len(blocks_of("python")) >= 8
    assert len(harvest_commands()) >= 4


def test_not_run_marks_are_rare_and_give_a_reason():
    marked = [b for b in blocks_of("python") if b.not_run is not None]
    for b in marked:
        assert len(b.not_run) >= 10, f"{b.where}: say why it is not run"
    assert len(marked) <= 2, [b.where for b in marked]


@pytest.mark.parametrize("path", files_with("python"), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_snippets_run(path, demo_dir, monkeypatch):
    monkeypatch.chdir(demo_dir)
    namespace: dict = {"__name__": "__docs__"}
    for b in fenced_blocks(path):
        if b.lang != "python" or b.not_run is not None:
            continue
        # padded so that tracebacks give the markdown file's line numbers
        code = compile("\n" * (b.line - 1) + b.code, str(path.relative_to(ROOT)), "exec")
        try:
            exec(code, namespace)
            continue
        except Exception:
            failure = f"{b.where} failed:\n{traceback.format_exc(limit=-4)}"
        pytest.fail(failure, pytrace=False)


def harvest_commands() -> list[tuple[str, str, list[str]]]:
    """(where, line, argv after `run`) for every `python -m harvest.run ...` / `harvest run ...` line."""
    out = []
    for b in blocks_of("bash"):
        for i, line in enumerate(b.code.splitlines()):
            words = shlex.split(line, comments=True)
            argv = words[3:] if words[:3] == ["python", "-m", "harvest.run"] else None
            argv = words[2:] if words[:2] == ["harvest", "run"] else argv
            if argv is not None:
                out.append((f"{b.path.relative_to(ROOT)}:{b.line + i}", line.split("#")[0].strip(), argv))
    return out


@pytest.mark.parametrize("where,line,argv", harvest_commands(), ids=[w for w, _, _ in harvest_commands()])
def test_bash_harvest_commands_parse(where, line, argv):
    """The command parses and its config loads with its --set overrides; nothing runs."""
    from harvest.cli.config import load
    from harvest.cli.main import parser

    try:
        args = parser().parse_args(["run", *argv])
    except SystemExit:
        pytest.fail(f"{where}: `{line}` is not a valid harvest command line", pytrace=False)
    if not (ROOT / args.config).is_file():
        pytest.fail(f"{where}: `{line}` names {args.config}, which does not exist", pytrace=False)
    try:
        load(ROOT / args.config, args.overrides)
    except Exception as e:
        pytest.fail(f"{where}: `{line}`: the config does not load: {e}", pytrace=False)
