"""`simpletuner examples list|copy NAME [DEST]`: the presets shipped in simpletuner/examples/."""

from __future__ import annotations

import os
import shutil
import sys

from simpletuner.config.loader import EXAMPLES_DIR, example_names


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: simpletuner examples list\n       simpletuner examples copy NAME [DEST]\n\n"
              "DEST defaults to config/NAME; train it with `simpletuner train env=NAME`.")
        return 0
    if argv[0] == "list":
        for name in example_names():
            print(name)
        return 0
    if argv[0] == "copy" and len(argv) in (2, 3):
        return copy_example(argv[1], argv[2] if len(argv) == 3 else os.path.join("config", argv[1]))
    print(f"simpletuner examples: unknown arguments {' '.join(argv)!r}; use `list` or `copy NAME [DEST]`.",
          file=sys.stderr)
    return 2


def copy_example(name: str, destination: str) -> int:
    if name not in example_names():
        print(f"There is no example named {name!r}. Available: {', '.join(example_names())}.", file=sys.stderr)
        return 2
    if os.path.exists(destination):
        print(f"{destination} already exists; choose another destination or remove it first.", file=sys.stderr)
        return 2
    shutil.copytree(EXAMPLES_DIR / name, destination)
    print(f"Copied example {name} to {destination}.")
    return 0
