"""`simpletuner configure [config.json]`: entry point of the interactive wizard."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print("usage: simpletuner configure [path/to/config.json]\n\n"
              "Interactive wizard that writes config/<env>/config.json and its multidatabackend.json.")
        return 0
    print("simpletuner configure: the interactive wizard is not implemented yet. Start from a preset instead: "
          "`simpletuner examples list`, then `simpletuner examples copy NAME` and edit config/NAME/config.json.",
          file=sys.stderr)
    return 2
