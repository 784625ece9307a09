"""`simpletuner examples list|copy NAME [DEST]`: the presets shipped in simpletuner/examples/."""

from __future__ import annotations

import json
import os
import shutil
import sys

from simpletuner.config.loader import COMPANION_FILE_OPTIONS, EXAMPLES_DIR, example_names


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
    _point_companions_at(destination)
    print(f"Copied example {name} to {destination}. Train it with `simpletuner train --env {os.path.basename(destination)}`"
          f" (after editing the dataset paths in {os.path.join(destination, 'multidatabackend.json')}).")
    return 0


def _point_companions_at(destination: str) -> None:
    """Files an example names beside itself (datasets, LyCORIS config) get paths valid from the working folder."""
    config_path = os.path.join(destination, "config.json")
    if not os.path.isfile(config_path):
        return
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    for key, value in config.items():
        beside = os.path.join(destination, value) if isinstance(value, str) else None
        if key.lstrip("-") in COMPANION_FILE_OPTIONS and beside and not os.path.isabs(value) and os.path.exists(beside):
            config[key] = beside
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=4)
        handle.write("\n")
