"""`simpletuner configure [config.json]`: the interactive wizard that writes a config and its dataset file."""

from __future__ import annotations

import sys

from simpletuner.config.errors import ConfigError

USAGE = """usage: simpletuner configure [path/to/config.json]

Without a path: asks about the model, LoRA, data, optimizer, schedule, validation,
checkpoints and logging, then writes config/config.json (or config/<env>/config.json)
and a multidatabackend.json beside it.

With a path: opens that config.json and lets you change one section at a time;
saving keeps every key that was there and changes only what you changed.

Ctrl-C stops at any point without writing anything (exit status 130)."""

EXIT_INTERRUPTED = 130
EXIT_BAD_INPUT = 2


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if len(argv) > 1:
        print(f"simpletuner configure: expected at most one config.json path, got {len(argv)} arguments.\n\n{USAGE}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("simpletuner configure is interactive and needs a terminal. To configure without one, copy a preset "
              "with `simpletuner examples copy NAME` and edit its config.json.", file=sys.stderr)
        return EXIT_BAD_INPUT
    from simpletuner.wizard import edit_config, new_config

    try:
        return edit_config(argv[0]) if argv else new_config()
    except KeyboardInterrupt:
        print("\nsimpletuner configure: cancelled, nothing was written.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        print(f"simpletuner configure: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
