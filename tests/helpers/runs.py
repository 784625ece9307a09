"""Helpers for end-to-end training tests: a tiny model, a few images, a config, a run."""

from __future__ import annotations

import json
from pathlib import Path

from simpletuner.config.loader import load_config
from simpletuner.config.validate import validate_settings
from simpletuner.training.trainer import Trainer


def write_dataset(root: Path, images: Path, resolution: int = 64) -> Path:
    backends = [
        {"id": "shapes", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile",
         "resolution": resolution, "resolution_type": "pixel", "minimum_image_size": 32, "crop": True,
         "crop_style": "center", "crop_aspect": "square", "cache_dir_vae": str(root / "cache" / "vae")},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "type": "local",
         "cache_dir": str(root / "cache" / "text")},
    ]
    path = root / "multidatabackend.json"
    path.write_text(json.dumps(backends))
    return path


def base_config(family: str, model_dir: Path, root: Path, images: Path, **overrides) -> dict:
    config = {
        "model_family": family, "pretrained_model_name_or_path": str(model_dir), "model_type": "lora",
        "output_dir": str(root / "output"), "data_backend_config": str(write_dataset(root, images)),
        "optimizer": "adamw_bf16", "learning_rate": 1e-2, "lr_scheduler": "constant", "train_batch_size": 2,
        "max_train_steps": 3, "mixed_precision": "no", "seed": 7, "report_to": "none", "resolution": 64,
        "resolution_type": "pixel", "lora_rank": 4,
    }
    config.update(overrides)
    return config


def run_trainer(config: dict) -> Trainer:
    """Validate a config dict, then run the trainer in-process on it; returns the Trainer, to inspect after."""
    argv = [f"--{key}={value}" for key, value in config.items()]
    settings = load_config(argv, environ={"CONFIG_BACKEND": "cmd"}).settings
    errors = validate_settings(settings)
    assert not errors, "\n".join(str(error) for error in errors)
    trainer = Trainer(settings)
    trainer.run()
    return trainer


def train(config: dict):
    """Run the trainer in-process on a config dict; returns its RunState."""
    return run_trainer(config).state
