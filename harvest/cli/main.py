"""`harvest run CONFIG [--set section.key=value ...] [--overwrite]` (also `python -m harvest.run CONFIG`),
`harvest verify RUN [--deep] [--repair]` (also `python -m harvest.verify RUN`) and `harvest info RUN`.

A user's mistake (any HarvestError: a bad config, model, task file or run folder) prints one line
and exits 2; anything else is a bug and keeps its traceback. HARVEST_DEBUG=1 shows the traceback
of user errors too.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from harvest import arc
from harvest.cli import inspect
from harvest.cli.commands import add_config_command, stop_signals_interrupt
from harvest.errors import HarvestError
from harvest.sae import cli as sae_cli

log = logging.getLogger("harvest")
_MACHINE_ERRORS = {
    errno.ENOSPC: "free space, then run the same command again to resume",
    errno.EDQUOT: "free space within your quota, then run the same command again to resume",
    errno.EROFS: "the file system is read-only; choose another output.path",
    errno.EACCES: "permission denied; check the file's permissions",
}


def format_report(summary: dict, out: str) -> str:
    s = summary["session"]
    lines = [
        f"harvest: {summary['sequences']} sequences, {summary['tokens']:,} tokens "
        f"(prefill {summary['tokens_per_phase']['prefill']:,}, decode {summary['tokens_per_phase']['decode']:,}) "
        f"in {out}",
        f"  on disk {summary['bytes_on_disk'] / 2**20:,.1f} MiB, activation compression "
        f"{summary['compression_ratio']:.2f}x",
        f"  this session: {s['sequences']} sequences in {s['seconds']:.1f} s, "
        f"{s['tokens_per_second']:,.0f} tok/s (prompt {s['prompt_tokens']:,} + generated {s['generated_tokens']:,})",
        f"  skipped: {summary['skipped_invalid']} invalid tasks, {summary['skipped_too_long']} prompts too long",
        arc.format_summary(summary["arc"]) if summary["arc"] else "  answers: not generated (prefill-only run)",
    ]
    return "\n".join(lines)


def _run_command(args) -> int:
    from harvest.cli import pipeline
    from harvest.cli.config import load
    from harvest.store.runfolder import read_commits

    cfg = load(args.config, args.overrides)
    try:
        with stop_signals_interrupt():  # SIGTERM and SIGINT end a run cleanly: complete sequences are committed
            summary = pipeline.run(cfg, args.overwrite)
    except KeyboardInterrupt:
        committed = sum(int(c["num_sequences"]) for c in read_commits(cfg.output.path).values())
        print(f"harvest: interrupted: {committed} sequences committed in {cfg.output.path}; "
              f"run the same command again to resume", file=sys.stderr)  # fmt: skip
        return 130
    print(format_report(summary, cfg.output.path))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="harvest", description="Harvest Qwen2 activations over ARC-AGI into Zarr.")
    sub = ap.add_subparsers(title="commands", required=True, metavar="COMMAND")
    add_config_command(
        sub, "run", _run_command, help="harvest activations as a YAML config says (see configs/demo.yaml)",
        description="Harvest activations into a run folder; re-running resumes it.", example="configs/demo.yaml",
        output="output run folder",
    )  # fmt: skip
    inspect.add_commands(sub)
    sae_cli.add_commands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    try:
        return args.command(args)
    except HarvestError as e:
        if os.environ.get("HARVEST_DEBUG") == "1":
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"harvest: error: {message}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's fault, not a bug: one line that names the file
        if e.errno not in _MACHINE_ERRORS or os.environ.get("HARVEST_DEBUG") == "1":
            raise
        print(f"harvest: error: {e.filename or 'a file'}: {e.strerror}; {_MACHINE_ERRORS[e.errno]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
