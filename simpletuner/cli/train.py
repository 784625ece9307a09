"""`simpletuner train` (also `python train.py` and `accelerate launch train.py`)."""

from __future__ import annotations

import os

from simpletuner.cli.common import build_help_parser, load_or_report, report_config_errors, setup_logging, wants_help
from simpletuner.config.errors import ConfigError
from simpletuner.config.validate import validate_settings


def main(argv: list[str]) -> int:
    if wants_help(argv):
        build_help_parser("simpletuner train", "Fine-tune a diffusion model. Every option below may also be set "
                                               "in config.json / config.toml / config.env.").print_help()
        return 0
    setup_logging()
    loaded = load_or_report(argv)
    if isinstance(loaded, int):
        return loaded
    errors = validate_settings(loaded.settings)
    if errors:
        return report_config_errors(errors)
    from simpletuner.cli.launch import launch_request, run_launch
    from simpletuner.training.distributed import adopt_local_rank
    from simpletuner.training.trainer import Trainer

    try:
        adopt_local_rank(loaded.settings, os.environ)
        request = launch_request(loaded.settings, loaded.config_path, os.environ)
        if request is not None:  # several processes: accelerate launch runs this same command in each
            return run_launch(request, loaded.settings, argv, os.environ)
        Trainer(loaded.settings).run()
    except ConfigError as exc:
        return report_config_errors([exc])
    return 0
