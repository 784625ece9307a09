"""The `simpletuner` command: dispatches to train, configure, check, cache and examples."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": ("simpletuner.cli.train", "run a training job"),
    "check": ("simpletuner.cli.check", "validate the config and datasets without loading a model"),
    "cache": ("simpletuner.cli.cache", "build the latent and text-embed caches, then exit"),
    "configure": ("simpletuner.cli.configure", "interactive wizard that writes a config"),
    "examples": ("simpletuner.cli.examples", "list or copy the shipped example configs"),
}


def usage() -> str:
    lines = ["usage: simpletuner <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run `simpletuner <command> --help` for a command's options.", "  --version  print the version"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("--version", "-V", "version"):
        from simpletuner import __version__

        print(f"simpletuner {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"simpletuner: unknown command {command!r}.\n\n{usage()}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[command][0])
    return module.main(argv[1:])


def entry() -> None:
    sys.exit(main())
