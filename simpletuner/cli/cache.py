"""`simpletuner cache`: build the latent and text-embed caches for a config, then exit."""

from __future__ import annotations

from simpletuner.cli.common import build_help_parser, load_or_report, report_config_errors, setup_logging, wants_help
from simpletuner.config.errors import ConfigError
from simpletuner.config.validate import validate_settings


def main(argv: list[str]) -> int:
    if wants_help(argv):
        build_help_parser("simpletuner cache", "Encode every dataset's latents and captions into the caches, "
                                               "then exit.").print_help()
        return 0
    setup_logging()
    loaded = load_or_report(argv)
    if isinstance(loaded, int):
        return loaded
    settings = loaded.settings
    errors = validate_settings(settings)
    if errors:
        return report_config_errors(errors)
    from simpletuner.data.pipeline import build_caches

    try:
        report = build_caches(settings)
    except ConfigError as exc:
        return report_config_errors([exc])
    print(report)
    return 0
