"""`python -m harvest.verify RUN [--deep] [--repair]`: the same as `harvest verify`."""

import sys

from harvest.cli.main import main as _main

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return _main(["verify", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
