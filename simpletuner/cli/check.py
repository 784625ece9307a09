"""`simpletuner check`: validate the configuration and datasets without loading any model."""

from __future__ import annotations

import json
import sys

from simpletuner.cli.common import build_help_parser, load_validated, report_config_errors, wants_help
from simpletuner.config.errors import ConfigError


def main(argv: list[str]) -> int:
    if wants_help(argv):
        build_help_parser("simpletuner check", "Validate a config (and its datasets) without loading a model. "
                                               "--json prints the resolved configuration.").print_help()
        return 0
    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    loaded = load_validated(argv)
    if isinstance(loaded, int):
        return loaded
    settings = loaded.settings
    if as_json:
        print(json.dumps(settings.as_dict(), default=str, sort_keys=True))
    out = sys.stderr if as_json else sys.stdout
    print(f"Configuration OK ({loaded.config_path or 'command line only'}).", file=out)
    return check_datasets(settings, out)


def check_datasets(settings, out) -> int:
    from simpletuner.data.pipeline import prepare_data

    try:
        report = prepare_data(settings, progress=False).report()
    except ConfigError as exc:
        return report_config_errors([exc])
    print(report, file=out)
    return 0
