"""`harvest verify RUN [--deep] [--repair]` and `harvest info RUN [--json]`: check and describe a run
folder without loading a model (harvest.store.verify does the work; this module prints it)."""

from __future__ import annotations

import json
import sys

from harvest.store.verify import repair_run, run_info, verify_run


def _progress(items, total):
    from tqdm.auto import tqdm

    return tqdm(items, total=total, unit="shard", desc="verify", disable=total < 2, file=sys.stderr)


def verify_command(args) -> int:
    report = verify_run(args.run, deep=args.deep, progress=_progress)
    checked = "files, sizes, checksums" + (" and every chunk decoded" if report.deep else "")
    print(
        f"verify {report.root}: {report.shards} shards, {report.files} files, "
        f"{report.bytes / 2**20:,.1f} MiB checked ({checked})"
    )
    if report.legacy_shards:
        print(f"  {report.legacy_shards} shards are format version 1: no checksums to compare (use --deep)")
    for f in report.findings:
        print(f"  {f.line()}")
    if report.ok:
        print("  ok: no findings")
        return 0
    if not args.repair:
        bad = report.damaged_shards()
        hint = f"; --repair quarantines {len(bad)} damaged shards" if bad else ""
        print(f"  {len(report.findings)} findings{hint} (then run the harvest again to regenerate them)")
        return 1
    for line in repair_run(report):
        print(f"  repair: {line}")
    left = report.unrepairable()  # findings that moving files cannot fix, one line of advice per kind
    for advice in left:
        print(f"  {advice}")
    if left:
        return 1
    print("  repaired: run the same harvest command again to regenerate the quarantined sequences")
    return 0


def info_command(args) -> int:
    info = run_info(args.run)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    phases = ", ".join(f"{p} {n:,}" for p, n in info["tokens_per_phase"].items())
    codec = (info["codec"] or {}).get("name")
    lines = [
        f"run {info['root']} (format {', '.join(map(str, info['format_versions'])) or '-'})",
        f"  model {info['model']}; data {info['dataset']['source']} {info['dataset']['split']}",
        f"  {info['shards']} shards, {info['sequences']:,} sequences, {info['tokens']:,} tokens ({phases})",
        f"  hooks: {', '.join(f'{h} [{w}]' for h, w in info['hooks'].items()) or '-'}",
        f"  storage {info['storage_dtype']}, codec {codec}; {info['bytes_on_disk'] / 2**20:,.1f} MiB on disk, "
        f"activation compression {info['compression_ratio']:.2f}x",
    ]
    for s in info["sessions"]:
        lines.append(
            f"  session {s.get('started')} -> {s.get('finished', 'unfinished')} on {s.get('host', '?')}"
            + (f" with {s['processes']} processes" if s.get("processes", 1) > 1 else "")
            + f", harvest {s.get('harvest_version', '?')}, resumed {s.get('resumed_sequences', 0)} sequences"
        )
    if info["leftovers"]:
        lines.append(f"  leftovers (the next harvest removes them): {', '.join(info['leftovers'])}")
    if info["quarantined"]:
        lines.append(f"  quarantined: {', '.join(info['quarantined'])}")
    print("\n".join(lines))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check a run folder against its commit records",
        description="Check every committed shard's files (presence, size, crc32c); exit 1 on any finding.",
    )
    p.add_argument("run", help="the run folder (a harvest's output.path)")
    p.add_argument("--deep", action="store_true", help="also decode every chunk of every array")
    p.add_argument(
        "--repair",
        action="store_true",
        help="move damaged shards to RUN/quarantine/ and drop their commit records, so the next harvest redoes them",
    )
    p.set_defaults(command=verify_command)
    p = sub.add_parser("info", help="describe a run folder", description="Shards, tokens, hooks, codec, sessions.")
    p.add_argument("run", help="the run folder (a harvest's output.path)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(command=info_command)
