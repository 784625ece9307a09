"""Rendering validation images with the family's pipeline, and writing them to disk.

A ``Renderer`` wraps one pipeline built over the live (unwrapped) denoiser and
draws one image per (prompt, size, index). Image ``index`` of every prompt and
size uses the seed ``round_seed + index``, so rounds with the same seed are
directly comparable and a render can be reused within a round (``RenderKey``).
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass

import torch
from PIL import Image

from simpletuner.validation.prompts import ValidationPrompt
from simpletuner.validation.sampling import call_arguments
from simpletuner.validation.schedulers import validation_scheduler

IMAGES_FOLDER = "validation_images"


@dataclass(frozen=True)
class RenderKey:
    shortname: str
    width: int
    height: int
    index: int

    @property
    def size_label(self) -> str:
        return f"{self.width}x{self.height}"


def fixed_seed(settings) -> int:
    """validation_seed, or seed when it is unset."""
    if settings.validation_seed is not None:
        return int(settings.validation_seed)
    return int(settings.seed or 0)


def round_seed(settings) -> int:
    """The seed of a validation round: a fresh one with validation_randomize, else ``fixed_seed``."""
    if settings.validation_randomize:
        return random.SystemRandom().randrange(2**31)
    return fixed_seed(settings)


def generator_device(settings, device: torch.device) -> torch.device:
    """validation_seed_source=cpu draws noise on the CPU (same images on any hardware); gpu on the training device."""
    return torch.device("cpu") if settings.validation_seed_source == "cpu" else torch.device(device)


class Renderer:
    def __init__(self, family, denoiser: torch.nn.Module, settings, device: torch.device, seed: int, autocast):
        self.pipeline = family.build_pipeline(denoiser=denoiser)
        scheduler = validation_scheduler(settings.validation_noise_scheduler, self.pipeline.scheduler,
                                         bool(family.flow_matching))
        if scheduler is not None:
            self.pipeline.scheduler = scheduler
        self.pipeline.set_progress_bar_config(disable=True)
        # Prompts are encoded as in training (text length, instructions), then the sampling options.
        self.arguments = {**family.pipeline_call_arguments(), **call_arguments(settings, type(self.pipeline))}
        self.generator_device = generator_device(settings, device)
        self.seed = seed
        self.autocast = autocast  # a callable returning the accelerator's autocast context

    def render(self, prompt: ValidationPrompt, key: RenderKey) -> Image.Image:
        generator = torch.Generator(device=self.generator_device).manual_seed(self.seed + key.index)
        with torch.no_grad(), self.autocast():
            result = self.pipeline(prompt=prompt.text, width=key.width, height=key.height, generator=generator,
                                   output_type="pil", **self.arguments)
        return result.images[0]


def render_keys(prompts: list[ValidationPrompt], sizes: list[tuple[int, int]], count: int) -> list[RenderKey]:
    return [RenderKey(prompt.shortname, width, height, index)
            for prompt in prompts for width, height in sizes for index in range(count)]


def image_name(step: int, prompt_slug: str, key: RenderKey, suffix: str = "") -> str:
    return f"step{step:06d}_{prompt_slug}_{key.size_label}_{key.index}{suffix}.png"


def save_png(image: Image.Image, folder: str, name: str) -> str:
    """Write ``image`` atomically (temporary file, then rename); returns the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    handle, staging = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG")
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return path


def stitch(images: list[Image.Image]) -> Image.Image:
    """The images side by side, left to right, top-aligned on a black canvas."""
    if len(images) == 1:
        return images[0]
    width = sum(image.width for image in images)
    height = max(image.height for image in images)
    canvas = Image.new("RGB", (width, height))
    left = 0
    for image in images:
        canvas.paste(image.convert("RGB"), (left, 0))
        left += image.width
    return canvas
