"""What a validation round renders (``RenderKey``), its seeds, and writing and stitching the images.

Image ``index`` of every prompt and size uses the seed ``round_seed + index``
(see ``renderer.Renderer``), so rounds with the same seed are directly
comparable and a render can be reused within a round.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
from PIL import Image

from simpletuner.atomic_files import staged_path
from simpletuner.validation.prompts import ValidationPrompt

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


def render_keys(prompts: list[ValidationPrompt], sizes: list[tuple[int, int]], count: int) -> list[RenderKey]:
    """Every (prompt, size, index) of a round; a prompt with an input image renders at that image's size only."""
    return [RenderKey(prompt.shortname, width, height, index)
            for prompt in prompts for width, height in ([prompt.input_size] if prompt.input_size else sizes)
            for index in range(count)]


def image_name(step: int, prompt_slug: str, key: RenderKey, suffix: str = "") -> str:
    return f"step{step:06d}_{prompt_slug}_{key.size_label}_{key.index}{suffix}.png"


def save_png(image: Image.Image, folder: str, name: str) -> str:
    """Write ``image`` atomically (temporary file, then rename); returns the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with staged_path(path, suffix=".png") as staging:
        image.save(staging, format="PNG")
    return path


def with_input(images: list[Image.Image], input_image: Image.Image | None, location: str) -> list[Image.Image]:
    """The panels of an img2img render with its input image first (location "left") or last ("right")."""
    if input_image is None:
        return list(images)
    return [input_image, *images] if location == "left" else [*images, input_image]


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
