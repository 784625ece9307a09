"""Writing the finished model: a LoRA file, or a full diffusers pipeline folder, plus the EMA variant."""

from __future__ import annotations

import os

from simpletuner.config.settings import Settings
from simpletuner.training import adapters


def save_outputs(family, denoiser, settings: Settings, ema=None, trainable=None) -> None:
    output_dir = settings.output_dir
    os.makedirs(output_dir, exist_ok=True)
    _save_one(family, denoiser, settings, output_dir)
    if ema is not None:
        with ema.swapped_in(trainable):
            _save_one(family, denoiser, settings, os.path.join(output_dir, "ema"))


def _save_one(family, denoiser, settings: Settings, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    if settings.model_type == "lora":
        metadata = {family.denoiser_subfolder: denoiser.peft_config["default"].to_dict()}
        family.save_lora(folder, adapters.lora_state_dict(denoiser), adapter_metadata=metadata)
    else:
        pipeline = family.build_pipeline(denoiser=denoiser)
        pipeline.save_pretrained(folder, safe_serialization=True)
