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
def sigterm_interrupts():
    """Within the block, SIGTERM raises KeyboardInterrupt like Ctrl-C."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
