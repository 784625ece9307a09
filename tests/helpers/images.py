"""Image folders for tests: copies of the session's sample images, and folders of random-noise images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE_SUFFIXES = (".png", ".jpg")


def copy_sample_images(source: Path, target: Path, count: int | None = None) -> Path:
    """Copy the first ``count`` images of ``source`` (all when None), each with its caption, into ``target``.

    make_sample_images draws image after image from one seeded generator, so the first N files of
    its six-image folder are exactly what it writes when asked for N images.
    """
    images = sorted(path for path in Path(source).iterdir() if path.suffix in SAMPLE_SUFFIXES)
    if count is not None:
        if count > len(images):
            raise ValueError(f"{source} holds {len(images)} sample images; {count} were asked for")
        images = images[:count]
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for image in images:
        for path in (image, image.with_suffix(".txt")):
            shutil.copy2(path, target / path.name)
    return target


def write_noise_images(folder: Path, sizes: list[tuple[int, int]], seed: int, stem: str) -> list[Path]:
    """Save one PNG of uniform random pixels per (width, height) as ``<stem><index>.png``; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index, (width, height) in enumerate(sizes):
        path = folder / f"{stem}{index}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths
