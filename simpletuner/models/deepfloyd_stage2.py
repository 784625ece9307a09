"""DeepFloyd IF stage II: the super-resolution UNet's conditioning, settings checks and validation pipeline.

Stage II turns a 64px image into a 256px one. Its UNet reads 6 channels: the
noisy high-resolution image and the low-resolution image upscaled back to full
size, itself noised to a "noise level" (noise-conditioning augmentation) that
the UNet also receives as ``class_labels``. IFSuperResolutionPipeline builds
that input with bilinear upscaling (align_corners) and its
``image_noising_scheduler``; training builds it the same way from the clean
training image shrunk by ``UPSCALE_FACTOR``, at a noise level drawn uniformly
from the noising schedule for each sample, so the model learns every level
inference may ask for (the pipeline's default is 250).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from simpletuner.config.settings import Settings

UPSCALE_FACTOR = 4  # IF stage II: 64px -> 256px
TEXT_PROMPT_OPTIONS = ("validation_prompt", "user_prompt_library", "validation_prompt_library")


def shrink(pixels: torch.Tensor) -> torch.Tensor:
    """The low-resolution image stage II upscales: ``pixels`` (B,3,H,W) area-averaged by UPSCALE_FACTOR."""
    height, width = pixels.shape[-2:]
    if height % UPSCALE_FACTOR or width % UPSCALE_FACTOR:
        raise ValueError(f"DeepFloyd IF stage II needs image sides divisible by {UPSCALE_FACTOR}, got "
                         f"{width}x{height}; use an aspect_bucket_alignment that is a multiple of 8")
    return F.interpolate(pixels, size=(height // UPSCALE_FACTOR, width // UPSCALE_FACTOR), mode="area")


def noised_upscale(low_resolution: torch.Tensor, size: tuple[int, int], noising_scheduler,
                   noise_levels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The low-resolution image upscaled to ``size`` and noised to ``noise_levels``, as the pipeline does."""
    upscaled = F.interpolate(low_resolution, size, mode="bilinear", align_corners=True)
    return noising_scheduler.add_noise(upscaled, noise, timesteps=noise_levels)


def training_condition(clean: torch.Tensor, noising_scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """(upscaled low-resolution input, noise levels) for clean training pixels (B,3,H,W).

    Draws from torch's global generator, which the trainer seeds (``seed``) and checkpoints restore.
    """
    count = clean.shape[0]
    levels = torch.randint(0, int(noising_scheduler.config.num_train_timesteps), (count,)).to(clean.device)
    noise = torch.randn(clean.shape, dtype=clean.dtype).to(clean.device)
    condition = noised_upscale(shrink(clean), tuple(clean.shape[-2:]), noising_scheduler, levels, noise)
    return condition, levels


def stage_ii_problems(settings: Settings) -> list[str]:
    """Settings a stage II run cannot honour: it upscales images, so it has no prompt-only render."""
    if settings.validation_disable:
        return []
    problems = []
    for option in TEXT_PROMPT_OPTIONS:
        if getattr(settings, option):
            problems.append(f"{option} does not work with a DeepFloyd IF stage II flavour, which upscales images "
                            f"and cannot render from a prompt alone; remove {option} and set "
                            "validation_using_datasets=true to upscale num_eval_images dataset images (shrunk "
                            f"{UPSCALE_FACTOR}x) at validation, or set validation_disable=true")
    return problems


@functools.cache
def upscale_validation_pipeline_class():
    """IFSuperResolutionPipeline that first shrinks its input image by UPSCALE_FACTOR.

    Validation hands it a dataset image at the training size and asks for that size back, so the
    model upscales exactly the kind of low-resolution image it was trained on.
    """
    from diffusers import IFSuperResolutionPipeline

    class ShrinkingSuperResolutionPipeline(IFSuperResolutionPipeline):
        def preprocess_image(self, image, num_images_per_prompt, device):
            full = super().preprocess_image(image, num_images_per_prompt, device)
            return shrink(full.float()).to(full.dtype)

    return ShrinkingSuperResolutionPipeline
