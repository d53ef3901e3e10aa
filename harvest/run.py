"""`python -m harvest.run CONFIG [--set section.key=value ...] [--overwrite]`: the same as `harvest run`.

`from harvest.run import run` gives the pipeline as a function: run(RunConfig) -> summary dict.
"""

import sys

from harvest.cli.main import main as _main
from harvest.cli.pipeline import run

__all__ = ["main", "run"]


def main(argv: list[str] | None = None) -> int:
    return _main(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
