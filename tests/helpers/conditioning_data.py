"""Conditioning folders for tests: edge maps and half masks beside a sample image folder, and configs using them."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageFilter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def make_edge_maps(images: Path, out: Path, extension: str = ".png", scale: float = 1.0) -> Path:
    """An edge map per image (same relative name, ``extension``), optionally stored at ``scale`` times its size."""
    for path in image_files(images):
        with Image.open(path) as image:
            edges = image.convert("L").filter(ImageFilter.FIND_EDGES).convert("RGB")
        if scale != 1.0:
            edges = edges.resize((round(edges.width * scale), round(edges.height * scale)))
        target = out / path.relative_to(images).with_suffix(extension)
        target.parent.mkdir(parents=True, exist_ok=True)
        edges.save(target)
    return out


def make_half_masks(images: Path, out: Path) -> Path:
    """A mask per image: black (ignore) on the left half, white (learn) on the right half."""
    for path in image_files(images):
        with Image.open(path) as image:
            width, height = image.size
        mask = Image.new("L", (width, height), 255)
        mask.paste(0, (0, 0, width // 2, height))
        target = out / path.relative_to(images).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        mask.convert("RGB").save(target)
    return out


def write_conditioning_dataset(root: Path, images: Path, conditioning: dict[str, tuple[Path, str]],
                               resolution: int = 64, **image_keys) -> Path:
    """multidatabackend.json: the image dataset 'shapes' linking conditioning datasets id -> (folder, type)."""
    shapes = {"id": "shapes", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile",
              "resolution": resolution, "resolution_type": "pixel", "minimum_image_size": 32, "crop": True,
              "crop_style": "center", "crop_aspect": "square", "cache_dir_vae": str(root / "cache" / "vae"),
              "conditioning_data": list(conditioning)}
    shapes.update(image_keys)
    backends = [shapes]
    for dataset_id, (folder, kind) in conditioning.items():
        backends.append({"id": dataset_id, "type": "local", "dataset_type": "conditioning",
                         "conditioning_type": kind, "instance_data_dir": str(folder),
                         "cache_dir_vae": str(root / "cache" / f"vae-{dataset_id}")})
    backends.append({"id": "text", "dataset_type": "text_embeds", "default": True, "type": "local",
                     "cache_dir": str(root / "cache" / "text")})
    path = root / "multidatabackend.json"
    path.write_text(json.dumps(backends))
    return path
