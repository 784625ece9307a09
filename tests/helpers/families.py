"""Model-family objects on the tiny models, for tests that call a family directly (no trainer)."""

from __future__ import annotations

from typing import Mapping

from simpletuner.config.settings import Settings
from simpletuner.data.types import TrainingBatch
from simpletuner.models.registry import get_family


def make_family(model_dirs: Mapping[str, str], family: str, **options):
    """``family``'s class on its tiny model (fp32 VAE) with extra ``options``; nothing is loaded yet."""
    values = {"model_family": family, "pretrained_model_name_or_path": model_dirs[family], "vae_dtype": "fp32"}
    values.update(options)
    return get_family(family)(Settings(values))


def make_batch(model, latents, prompts: list[str], sizes: tuple[int, int] = (64, 96)) -> TrainingBatch:
    """A batch of ``latents`` with ``prompts`` encoded by ``model``; every sample uncropped at ``sizes``."""
    count = latents.shape[0]
    return TrainingBatch(latents=latents, text=model.encode_text(prompts), original_sizes=[sizes] * count,
                         crop_coords=[(0, 0)] * count, target_sizes=[sizes] * count,
                         sample_ids=[f"s{i}" for i in range(count)])
