"""`python -m harvest.train CONFIG [--set section.key=value ...] [--overwrite]`: the same as `harvest train`.

`from harvest.train import train` gives the trainer as a function: train(TrainConfig) -> summary dict.
"""

import sys

from harvest.cli.main import main as _main
from harvest.sae.trainer import train

__all__ = ["main", "train"]


def main(argv: list[str] | None = None) -> int:
    return _main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
