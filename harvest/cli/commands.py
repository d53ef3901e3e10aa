"""What the config-driven commands (`harvest run`, `harvest train`) share: their arguments, and
SIGTERM ending them the way Ctrl-C does (complete work is kept; the same command resumes)."""

from __future__ import annotations

import contextlib
import signal


def add_config_command(sub, name: str, command, help: str, description: str, example: str, output: str) -> None:
    """`harvest NAME CONFIG [--set section.key=value ...] [--overwrite]`."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("config", help=f"YAML config (see {example})")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key (value parsed as YAML); repeatable",
    )
    p.add_argument("--overwrite", action="store_true", help=f"delete the {output} and start over")
    p.set_defaults(command=command)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals_interrupt():
    """Within the block, SIGTERM and SIGINT raise KeyboardInterrupt: a clean stop, committed shards kept.
    SIGINT too, because a process started in the background by a script (`harvest run ... &`) inherits
    SIGINT ignored, and Python then never turns it into KeyboardInterrupt."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
