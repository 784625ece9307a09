"""`python -m simpletuner.demo`: build the tiny model and sample images, then train the demo example.

Everything goes under .demo/ in the current folder; running it again reuses what is there.
"""

from __future__ import annotations

import sys

from simpletuner.cli.train import main as train_main
from simpletuner.demo.sample_data import make_sample_images
from simpletuner.models.tiny import build_tiny

MODEL_DIR = ".demo/models/tiny-sdxl"
DATA_DIR = ".demo/data"


def main(argv: list[str]) -> int:
    build_tiny("sdxl", MODEL_DIR)
    make_sample_images(DATA_DIR)
    return train_main(["example=demo", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
