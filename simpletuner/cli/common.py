"""Shared CLI plumbing: loading settings with friendly errors, and `--help` from the option table."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from simpletuner.config.errors import ConfigError, ConfigErrors
from simpletuner.config.loader import LoadedConfig, load_config

EXIT_CONFIG_ERROR = 2


def report_config_errors(errors: list[ConfigError]) -> int:
    count = len(errors)
    heading = "Configuration error" if count == 1 else f"{count} configuration errors"
    print(f"{heading}:\n", file=sys.stderr)
    for error in errors:
        print(f"- {error}\n", file=sys.stderr)
    return EXIT_CONFIG_ERROR


def load_or_report(argv: list[str]) -> LoadedConfig | int:
    """LoadedConfig, or the exit status after printing the errors."""
    try:
        return load_config(argv)
    except ConfigErrors as exc:
        return report_config_errors(exc.errors)
    except ConfigError as exc:
        return report_config_errors([exc])


def load_validated(argv: list[str]) -> LoadedConfig | int:
    """Settings from every source, checked by every rule; or the exit status after printing the problems."""
    from simpletuner.config.validate import validate_settings

    setup_logging()
    loaded = load_or_report(argv)
    if isinstance(loaded, int):
        return loaded
    errors = validate_settings(loaded.settings)
    return report_config_errors(errors) if errors else loaded


def build_help_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser whose only job is printing --help from the option table."""
    from simpletuner.config.options import GROUP_ORDER, OPTIONS

    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Config selection: --env NAME | env=NAME | --example NAME | example=NAME, "
                                            "or CONFIG_BACKEND/CONFIG_PATH; default config/config.json.")
    groups = {name: parser.add_argument_group(name) for name in GROUP_ORDER}
    for option in OPTIONS.values():
        group = groups.setdefault(option.group, parser.add_argument_group(option.group))
        names = [f"--{option.name}"] + [f"--{alias}" for alias in option.aliases]
        extra = []
        if option.status != "built":
            extra.append("not implemented yet")
        if option.required:
            extra.append("required")
        suffix = f" [{'; '.join(extra)}]" if extra else ""
        default = "" if option.default in (None, False, "") else f" (default: {option.default})"
        help_text = (option.help + default + suffix).replace("%", "%%")
        kwargs = {"help": help_text, "dest": option.name}
        if option.kind == "bool":
            kwargs.update(nargs="?", const=True, metavar="true|false")
        elif option.choices is not None:
            kwargs.update(choices=option.choices, type=type(option.choices[0]))
        else:
            kwargs.update(metavar=option.metavar or option.name.upper())
        group.add_argument(*names, **kwargs)
    return parser


def wants_help(argv: list[str]) -> bool:
    return "-h" in argv or "--help" in argv


def setup_logging() -> None:
    level = os.environ.get("SIMPLETUNER_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("PIL", "urllib3", "botocore", "boto3", "s3transfer", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # torchao (imported by peft) reports missing CUDA kernels at import time on every CPU machine.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
