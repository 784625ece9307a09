"""Resolution math and aspect buckets: where each image ends up and how it gets there.

``plan_image`` decides, from an image's size and its dataset's options, the
size to resize it to (``intermediate_size``), where to crop it (``crop_offset``,
top/left) and the final size (``target_size``, the aspect bucket). It either
returns an ``ImagePlan`` or a ``SizeRejection`` saying why the image is not
used.

Units follow ``resolution_type``:
- ``pixel``: resolution is the shorter edge in pixels; minimum/maximum sizes
  compare to the shorter edge.
- ``area``: resolution is megapixels (1.0 = 1,000,000 pixels).
- ``pixel_area``: resolution is in pixels but means an area of resolution**2.

Behaviour that follows the reference (DATALOADER.md):
- With ``crop`` on, the crop is taken from the image at its own size; it is
  only shrunk first when it is larger than ``maximum_image_size`` and
  ``target_downsample_size`` is set (to that size), and only enlarged when it
  is too small to hold the crop.
- With ``crop`` off, the image is resized to cover its bucket while keeping
  its aspect ratio; the few pixels of rounding are trimmed from the centre.
- Bucket sides are the nearest multiple of ``aspect_bucket_alignment`` to the
  exact size, e.g. pixel_area 1024 gives 1024x1024, 1216x832 and 832x1216.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from simpletuner.data.dataset_spec import DatasetSpec

TOO_SMALL = "too small"
ASPECT_OUT_OF_RANGE = "aspect ratio out of range"
NO_BUCKET = "no bucket within max_upscale_threshold"


@dataclass(frozen=True)
class ImagePlan:
    intermediate_size: tuple[int, int]  # (width, height) to resize the original to
    crop_offset: tuple[int, int]  # (top, left) inside the intermediate image
    target_size: tuple[int, int]  # (width, height): the bucket


@dataclass(frozen=True)
class SizeRejection:
    """Why an image is not used; ``category`` groups rejections in reports."""

    category: str
    detail: str

    def __str__(self) -> str:
        return f"{self.category}: {self.detail}"


def aspect_of(width: float, height: float, rounding: int) -> float:
    return round(width / height, rounding)


def area_in_pixels(value: float, resolution_type: str) -> float:
    """An area-type size (resolution, minimum, maximum...) expressed in pixels."""
    return value * 1_000_000 if resolution_type == "area" else value * value


def align(value: float, alignment: int) -> int:
    """Nearest multiple of alignment, never below one multiple."""
    return max(alignment, int(round(value / alignment)) * alignment)


def bucket_size(aspect: float, spec: DatasetSpec) -> tuple[int, int]:
    """(width, height) of the bucket for an aspect ratio at the dataset's resolution."""
    alignment = spec.aspect_bucket_alignment
    if spec.resolution_type == "pixel":
        short = spec.resolution
        width, height = (short * aspect, short) if aspect >= 1 else (short, short / aspect)
    else:
        pixels = area_in_pixels(spec.resolution, spec.resolution_type)
        width, height = math.sqrt(pixels * aspect), math.sqrt(pixels / aspect)
    return align(width, alignment), align(height, alignment)


def planning_config(spec: DatasetSpec) -> dict:
    """The options that decide plans; saved with the bucket index."""
    return {**geometry_config(spec), **filter_config(spec)}


def geometry_config(spec: DatasetSpec) -> dict:
    """Options that change the size or crop of a kept image (and so its cached latents)."""
    buckets = list(spec.crop_aspect_buckets) if spec.crop_aspect_buckets else None
    return {
        "resolution": spec.resolution,
        "resolution_type": spec.resolution_type,
        "crop": spec.crop,
        "crop_style": spec.crop_style,
        "crop_aspect": spec.crop_aspect,
        "crop_aspect_buckets": buckets,
        "maximum_image_size": spec.maximum_image_size,
        "target_downsample_size": spec.target_downsample_size,
        "aspect_bucket_alignment": spec.aspect_bucket_alignment,
        "aspect_bucket_rounding": spec.aspect_bucket_rounding,
        "max_upscale_threshold": spec.max_upscale_threshold,  # it can change the chosen bucket
    }


def filter_config(spec: DatasetSpec) -> dict:
    """Options that only decide which images are kept."""
    return {
        "minimum_image_size": spec.minimum_image_size,
        "minimum_aspect_ratio": spec.minimum_aspect_ratio,
        "maximum_aspect_ratio": spec.maximum_aspect_ratio,
    }


def uses_random_planning(spec: DatasetSpec) -> bool:
    """True when plans depend on the random generator (random crop position or random bucket)."""
    if not spec.crop:
        return False
    return spec.crop_style == "random" or spec.crop_aspect == "random"


def plan_image(width: int, height: int, spec: DatasetSpec, rng: random.Random) -> ImagePlan | SizeRejection:
    """Decide how an image of this size is resized and cropped, or why it is skipped."""
    aspect = aspect_of(width, height, spec.aspect_bucket_rounding)
    rejection = _filter(width, height, aspect, spec)
    if rejection is not None:
        return rejection
    if not spec.crop:
        target = bucket_size(aspect, spec)
        intermediate = _cover((width, height), target)
        return ImagePlan(intermediate, _offset(intermediate, target, "center", rng), target)
    working = _downsampled((width, height), spec)
    chosen = _choose_aspect(aspect, working, spec, rng)
    if isinstance(chosen, SizeRejection):
        return chosen
    target = bucket_size(chosen, spec)
    intermediate = _cover(working, target, enlarge_only=True)
    return ImagePlan(intermediate, _offset(intermediate, target, spec.crop_style, rng), target)


def _filter(width: int, height: int, aspect: float, spec: DatasetSpec) -> SizeRejection | None:
    if spec.minimum_aspect_ratio and aspect < spec.minimum_aspect_ratio:
        return SizeRejection(ASPECT_OUT_OF_RANGE, f"{width}x{height} has aspect {aspect}, below "
                                                  f"minimum_aspect_ratio {spec.minimum_aspect_ratio}")
    if spec.maximum_aspect_ratio and aspect > spec.maximum_aspect_ratio:
        return SizeRejection(ASPECT_OUT_OF_RANGE, f"{width}x{height} has aspect {aspect}, above "
                                                  f"maximum_aspect_ratio {spec.maximum_aspect_ratio}")
    minimum = spec.minimum_image_size
    if not minimum:
        return None
    if spec.resolution_type == "pixel":
        if min(width, height) < minimum:
            return SizeRejection(TOO_SMALL, f"{width}x{height} has a shorter edge under minimum_image_size "
                                            f"{minimum:g}px")
    elif width * height < area_in_pixels(minimum, spec.resolution_type):
        needed = int(area_in_pixels(minimum, spec.resolution_type))
        return SizeRejection(TOO_SMALL, f"{width}x{height} has {width * height} pixels, under minimum_image_size "
                                        f"{minimum:g} ({spec.resolution_type}: {needed} pixels)")
    return None


def _exceeds(size: tuple[int, int], limit: float, resolution_type: str) -> bool:
    if resolution_type == "pixel":
        return min(size) > limit
    return size[0] * size[1] > area_in_pixels(limit, resolution_type)


def _downsampled(size: tuple[int, int], spec: DatasetSpec) -> tuple[int, int]:
    """Shrink an image above maximum_image_size to target_downsample_size, keeping its aspect."""
    limit, goal = spec.maximum_image_size, spec.target_downsample_size
    if not limit or not goal or not _exceeds(size, limit, spec.resolution_type):
        return size
    width, height = size
    if spec.resolution_type == "pixel":
        scale = goal / min(width, height)
    else:
        scale = math.sqrt(area_in_pixels(goal, spec.resolution_type) / (width * height))
    if scale >= 1:
        return size
    return max(1, round(width * scale)), max(1, round(height * scale))


def _cover(size: tuple[int, int], target: tuple[int, int], enlarge_only: bool = False) -> tuple[int, int]:
    """Scale size (keeping aspect) so it just covers target; with enlarge_only, never shrink."""
    scale = max(target[0] / size[0], target[1] / size[1])
    if enlarge_only and scale <= 1:
        return size
    return max(target[0], round(size[0] * scale)), max(target[1], round(size[1] * scale))


def _upscale_allowed(working: tuple[int, int], target: tuple[int, int], threshold: float | None) -> bool:
    if threshold is None:
        return True
    factor = max(target[0] / working[0], target[1] / working[1])
    return round(factor - 1.0, 2) <= threshold


def _choose_aspect(aspect: float, working: tuple[int, int], spec: DatasetSpec,
                   rng: random.Random) -> float | SizeRejection:
    if spec.crop_aspect == "square":
        return 1.0
    if spec.crop_aspect == "preserve" or not spec.crop_aspect_buckets:
        return aspect
    usable = [b for b in spec.crop_aspect_buckets
              if _upscale_allowed(working, bucket_size(b, spec), spec.max_upscale_threshold)]
    if not usable:
        return SizeRejection(NO_BUCKET, f"{working[0]}x{working[1]} would need more than "
                                        f"{spec.max_upscale_threshold:g} upscaling for every crop_aspect_bucket")
    if spec.crop_aspect == "closest":
        return min(usable, key=lambda b: abs(b - aspect))
    return rng.choice(usable)


def _offset(intermediate: tuple[int, int], target: tuple[int, int], style: str,
            rng: random.Random) -> tuple[int, int]:
    spare_x, spare_y = intermediate[0] - target[0], intermediate[1] - target[1]
    if style == "corner":  # the bottom-right corner, as the reference crops
        return spare_y, spare_x
    if style == "random":
        return rng.randint(0, spare_y), rng.randint(0, spare_x)
    return spare_y // 2, spare_x // 2
