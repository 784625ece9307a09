"""What the step and memory benchmarks share: a tiny SDXL project on disk and a trainer run on it
with a timing callback in place of the usual ones (no validation, trackers or checkpoints)."""

from __future__ import annotations

import json
import os


def write_project(root: str, resolution: int) -> str:
    """The tiny SDXL model, 8 sample images and a multidatabackend.json under ``root``; returns the model folder."""
    from simpletuner.demo.sample_data import make_sample_images
    from simpletuner.models.tiny import build_tiny

    model = build_tiny("sdxl", os.path.join(root, "model"))
    make_sample_images(os.path.join(root, "images"), count=8)
    backends = [
        {"id": "bench", "type": "local", "instance_data_dir": os.path.join(root, "images"),
         "caption_strategy": "textfile", "resolution": resolution, "resolution_type": "pixel",
         "minimum_image_size": 16, "crop": True, "crop_style": "center", "crop_aspect": "square",
         "cache_dir_vae": os.path.join(root, "cache", "vae")},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "type": "local",
         "cache_dir": os.path.join(root, "cache", "text")},
    ]
    with open(os.path.join(root, "multidatabackend.json"), "w") as handle:
        json.dump(backends, handle)
    return model


def lora_settings(root: str, output_name: str, steps: int, batch: int, resolution: int, **overrides):
    """Settings for a rank-8 LoRA run on the project ``write_project`` made; ``overrides`` are option values."""
    from simpletuner.config.loader import load_config

    config = {"model_family": "sdxl", "pretrained_model_name_or_path": os.path.join(root, "model"),
              "model_type": "lora", "lora_rank": 8, "output_dir": os.path.join(root, "out", output_name),
              "data_backend_config": os.path.join(root, "multidatabackend.json"), "optimizer": "adamw_bf16",
              "learning_rate": 1e-4, "lr_scheduler": "constant", "train_batch_size": batch,
              "max_train_steps": steps, "mixed_precision": "no", "seed": 1, "report_to": "none",
              "resolution": resolution, "resolution_type": "pixel", "resume_from_checkpoint": "none",
              **overrides}
    return load_config([f"--{key}={value}" for key, value in config.items()],
                       environ={"CONFIG_BACKEND": "cmd"}).settings


def train_with(settings, callback, announce_start: bool = False):
    """Set the trainer up, train with ``callback`` as its only callback, close the data; returns the trainer."""
    from simpletuner.training.callbacks import CallbackList
    from simpletuner.training.trainer import Trainer

    trainer = Trainer(settings)
    trainer.setup_accelerator()
    trainer.setup_model()
    trainer.setup_data()
    trainer.setup_trainable()
    trainer.setup_optimization()
    trainer.callbacks = CallbackList([callback])
    if announce_start:
        trainer.callbacks.on_train_start(trainer)
    trainer.train()
    trainer.data.close()
    return trainer
