"""validation_resolution -> a list of (width, height) render sizes.

Each comma-separated entry is ``WIDTHxHEIGHT``, a pixel edge (``1024`` gives a
square) or, below 16, megapixels (``1.0`` is 1024x1024; the edge is rounded to
a multiple of 64). Sizes must be multiples of 8, the VAE's downscale.
"""

from __future__ import annotations

import math

from simpletuner.config.errors import ConfigError

SIZE_MULTIPLE = 8
MEGAPIXEL_LIMIT = 16  # smaller numbers are megapixels, larger ones pixel edges
MEGAPIXEL_EDGE = 1024  # 1.0 megapixel, as SimpleTuner counts it
MEGAPIXEL_ROUNDING = 64


def parse_resolutions(value) -> list[tuple[int, int]]:
    text = str(value if value is not None else "").strip()
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    if not entries:
        raise ConfigError("validation_resolution", "validation_resolution is empty; give a size such as 1024, "
                                                   "1216x832 or 1.0 (megapixels).")
    sizes = []
    for entry in entries:
        size = _parse_entry(entry, text)
        if size not in sizes:
            sizes.append(size)
    return sizes


def _parse_entry(entry: str, whole: str) -> tuple[int, int]:
    if "x" in entry.lower():
        width, height = (_number(part, whole) for part in entry.lower().split("x", 1))
    else:
        number = _number(entry, whole)
        if number < MEGAPIXEL_LIMIT:
            edge = math.sqrt(number) * MEGAPIXEL_EDGE
            width = height = max(MEGAPIXEL_ROUNDING, round(edge / MEGAPIXEL_ROUNDING) * MEGAPIXEL_ROUNDING)
        else:
            width = height = number
    if width != int(width) or height != int(height):
        raise ConfigError("validation_resolution", f"validation_resolution={whole!r}: {entry!r} is not a whole "
                                                   "number of pixels; write e.g. 1024 or 1216x832.")
    width, height = int(width), int(height)
    if width <= 0 or height <= 0 or width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise ConfigError("validation_resolution", f"validation_resolution={whole!r}: {width}x{height} must be "
                                                   f"positive multiples of {SIZE_MULTIPLE}; e.g. use "
                                                   f"{_nearest(width)}x{_nearest(height)}.")
    return width, height


def _number(text: str, whole: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ConfigError("validation_resolution", f"validation_resolution={whole!r}: {text.strip()!r} is not a "
                                                   "number; write sizes like 1024, 1216x832 or 1.0, separated by "
                                                   "commas.") from None


def _nearest(value: int) -> int:
    return max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)
