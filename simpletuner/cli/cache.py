"""`simpletuner cache`: build the latent and text-embed caches for a config, then exit."""

from __future__ import annotations

from simpletuner.cli.common import build_help_parser, load_validated, report_config_errors, wants_help
from simpletuner.config.errors import ConfigError


def main(argv: list[str]) -> int:
    if wants_help(argv):
        build_help_parser("simpletuner cache", "Encode every dataset's latents and captions into the caches, "
                                               "then exit.").print_help()
        return 0
    loaded = load_validated(argv)
    if isinstance(loaded, int):
        return loaded
    try:
        report = build_caches(loaded.settings)
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
