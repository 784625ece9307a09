"""Turning a stored image into the exact pixels its ``ImageRecord`` planned."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps

from simpletuner.data.storage.base import Storage
from simpletuner.data.types import ImageRecord


def open_image(data: bytes) -> Image.Image:
    """Decode image bytes into an upright RGB image (EXIF orientation applied)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        upright = ImageOps.exif_transpose(image)
        return _to_rgb(upright)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def load_image(storage: Storage, path: str) -> Image.Image:
    """Read an image from storage as upright RGB; transparent areas become white."""
    return open_image(storage.read_bytes(path))


def apply_plan(image: Image.Image, record: ImageRecord) -> Image.Image:
    """Resize to the record's intermediate size, then crop its target size at its offset."""
    if image.size != tuple(record.original_size):
        raise ValueError(
            f"{record.sample_id}: image is {image.size[0]}x{image.size[1]} but was "
            f"{record.original_size[0]}x{record.original_size[1]} when the dataset was indexed; "
            "the file changed, so discovery must run again (it will, on the next start)."
        )
    if image.size != tuple(record.intermediate_size):
        image = image.resize(record.intermediate_size, resample=Image.Resampling.LANCZOS, reducing_gap=3.0)
    top, left = record.crop_offset
    width, height = record.target_size
    if (left, top, width, height) != (0, 0, *image.size):
        image = image.crop((left, top, left + width, top + height))
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float tensor in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float()
    return tensor / 127.5 - 1.0


def load_pixels(record: ImageRecord, storage: Storage) -> torch.Tensor:
    """The record's image as a (3, H, W) tensor in [-1, 1], resized and cropped exactly as planned."""
    return to_tensor(apply_plan(load_image(storage, record.path), record))
