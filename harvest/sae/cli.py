"""`harvest train CONFIG [--set section.key=value ...] [--overwrite]` (also `python -m harvest.train CONFIG`):
train a sparse coder on a harvest store as a YAML config says (configs/sae-demo.yaml, docs/SAE.md)."""

from __future__ import annotations

import sys

from harvest.cli.commands import add_config_command, stop_signals_interrupt

__all__ = ["add_commands", "train_command", "format_report"]


def _fmt(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _figures_line(name: str, f: dict) -> str:
    parts = [f"{name}: variance explained {_fmt(f.get('variance_explained'))} (fvu {_fmt(f.get('fvu'))}), "
             f"L0 {_fmt(f.get('l0'), '.1f')} over {f.get('window_tokens', f.get('tokens', 0)):,} tokens"]  # fmt: skip
    for phase, label in (("prefill", "prompt"), ("decode", "answer")):
        p = f.get(phase) or {}
        if p.get("tokens"):
            parts.append(f"{label} {_fmt(p.get('variance_explained'))}")
    return "; ".join(parts)


def format_report(summary: dict, out: str) -> str:
    s, tr = summary["session"], summary["train"]
    hooks = summary["hooks"]
    hook = hooks["in"] if hooks["in"] == hooks["out"] else f"{hooks['in']} -> {hooks['out']}"
    lines = [
        f"harvest train: {summary['architecture']} d_sae {summary['d_sae']:,} k {summary['k']} on {hook}, "
        f"{summary['steps']:,} steps, {summary['tokens']:,} tokens in {out}",
        f"  this session: {s['steps']:,} steps in {s['seconds']:.1f} s, {_fmt(s['tokens_per_second'], ',.0f')} tok/s "
        f"on {s['devices']} device(s)" + (f", resumed from step {s['resumed_from']}" if s["resumed_from"] else ""),
        "  " + _figures_line("train (last window)", tr),
        "  " + _figures_line(f"eval ({summary['heldout_sequences']} held-out sequences)", summary["eval"]),
        f"  dead latents: {tr.get('dead', '-')} of {summary['d_sae']:,}",
        *_spliced_lines(summary.get("spliced")),
        f"  saved: {', '.join(f'{k} {v}' for k, v in summary['paths'].items() if k in ('sae', 'saelens'))}",
    ]
    return "\n".join(lines)


def _spliced_lines(sp: dict | None) -> list[str]:
    if not sp:
        return []
    if "skipped" in sp:
        return [f"  spliced model: skipped ({sp['skipped']})"]
    lines = [f"  spliced model ({sp['sequences']} held-out sequences, the SAE substituted at {sp['hook']}):"]
    for part in ("prompt", "answer"):
        p = sp[part]
        if p["ce_clean"] is not None:
            lines.append(
                f"    {part} tokens: CE {_fmt(p['ce_clean'])} clean, {_fmt(p['ce_spliced'])} spliced "
                f"({_fmt(p['ce_increase'], '+.4f')}), {_fmt(p['ce_zero_ablation'])} zero-ablated; "
                f"loss recovered {_fmt(p['loss_recovered'])}"
            )
    if sp.get("answers"):
        a = sp["answers"]
        lines.append(f"    greedy answers whose grid changes: {a['changed']} of {a['answers']}")
    return lines


def train_command(args) -> int:
    from harvest.sae.config import load
    from harvest.sae.trainer import train

    cfg = load(args.config, args.overrides)
    try:
        with stop_signals_interrupt():
            summary = train(cfg, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(f"harvest train: interrupted; run the same command again to resume from the last checkpoint in "
              f"{cfg.output.path}/checkpoints", file=sys.stderr)  # fmt: skip
        return 130
    print(format_report(summary, cfg.output.path))
    return 0


def add_commands(sub) -> None:
    add_config_command(
        sub, "train", train_command,
        help="train a TopK SAE / transcoder on a run folder (see configs/sae-demo.yaml)",
        description="Train a sparse coder on a harvest store; re-running resumes from the last checkpoint.",
        example="configs/sae-demo.yaml", output="output folder",
    )  # fmt: skip
