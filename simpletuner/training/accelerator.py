"""Building the accelerate ``Accelerator`` from the settings."""

from __future__ import annotations

import os

import torch

from simpletuner.config.settings import Settings
from simpletuner.integrations.trackers import tracker_config, tracker_errors, tracker_init_kwargs, tracker_names

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def weight_dtype_for(settings: Settings) -> torch.dtype:
    """dtype of the frozen weights: follows mixed_precision; trainable weights stay float32."""
    return DTYPES.get(settings.mixed_precision or "no", torch.float32)


def trackers(settings: Settings) -> list[str]:
    """Trackers to start; raises ConfigError when a named tracker's package is missing."""
    errors = tracker_errors(settings)
    if errors:
        raise errors[0]
    return tracker_names(settings)


def build_accelerator(settings: Settings):
    from accelerate.utils import ProjectConfiguration, set_seed

    from simpletuner.training.sharding import create_accelerator

    logging_dir = os.path.join(settings.output_dir, settings.logging_dir or "logs")
    project = ProjectConfiguration(project_dir=settings.output_dir, logging_dir=logging_dir)
    log_with = trackers(settings)
    accelerator = create_accelerator(  # FSDP2 / DeepSpeed when asked for (training/sharding.py)
        settings,
        mixed_precision=settings.mixed_precision or "no",
        gradient_accumulation_steps=int(settings.gradient_accumulation_steps or 1),
        log_with=log_with or None,
        project_config=project,
    )
    if settings.seed is not None:
        set_seed(int(settings.seed), device_specific=bool(settings.seed_for_each_device))
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = not settings.disable_tf32
        torch.backends.cudnn.allow_tf32 = not settings.disable_tf32
    if settings.torch_num_threads:
        torch.set_num_threads(int(settings.torch_num_threads))
    if log_with and accelerator.is_main_process:
        accelerator.init_trackers(settings.tracker_project_name or "simpletuner",
                                  config=tracker_config(settings),
                                  init_kwargs=tracker_init_kwargs(settings, log_with, logging_dir))
    return accelerator
