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
    try:
        report = build_caches(settings)
    except ConfigError as exc:
        return report_config_errors([exc])
    print(report)
    return 0


def build_caches(settings) -> str:
    """Load the family's encoders, encode everything missing, and describe the result."""
    import torch

    from simpletuner.data.pipeline import prepare_data
    from simpletuner.models.registry import get_family
    from simpletuner.training.accelerator import weight_dtype_for

    family = get_family(settings.model_family, settings)(settings)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    family.load(device, weight_dtype_for(settings))
    pipeline = prepare_data(settings, family=family)
    pipeline.close()
    return pipeline.report()
