"""Entry point for `python train.py ...` and `accelerate launch train.py ...`."""

import sys

from simpletuner.cli.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
