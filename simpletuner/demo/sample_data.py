"""A small captioned image set of coloured shapes, generated locally.

Each image is one shape (circle, square, triangle) or a set of stripes on a
plain background, in square, landscape and portrait sizes between 64 and
160 px, saved as PNG or JPEG next to a ``.txt`` caption such as
"a red circle on a blue background". The same seed gives the same files.

    python -m simpletuner.demo.sample_data OUT [--count 24] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (130, 50, 170),
    "pink": (240, 130, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "stripes")
# (width, height): square, landscape and portrait sizes.
SIZES = ((64, 64), (96, 96), (128, 128), (160, 96), (128, 80), (144, 112), (96, 160), (80, 128), (112, 144))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, size: tuple[int, int], colour, rng: random.Random) -> str:
    """Draw one shape; return the words describing it (e.g. "large circle")."""
    width, height = size
    if shape == "stripes":
        vertical = rng.random() < 0.5
        span = width if vertical else height
        band = max(4, span // rng.choice((6, 8, 10)))
        for start in range(0, span, 2 * band):
            box = (start, 0, start + band - 1, height) if vertical else (0, start, width, start + band - 1)
            draw.rectangle(box, fill=colour)
        return ("vertical" if vertical else "horizontal") + " stripes"
    extent = int(min(width, height) * rng.uniform(0.35, 0.8))
    left = rng.randint(0, width - extent)
    top = rng.randint(0, height - extent)
    box = (left, top, left + extent - 1, top + extent - 1)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(left + extent // 2, top), (left, top + extent - 1), (left + extent - 1, top + extent - 1)],
                     fill=colour)
    scale = "small " if extent < 0.5 * min(width, height) else "large " if extent > 0.7 * min(width, height) else ""
    return scale + shape


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _caption(shape_words: str, colour_name: str, background_name: str) -> str:
    background = _with_article(f"{background_name} background")
    if shape_words.endswith("stripes"):
        return f"{shape_words.split()[0]} {colour_name} stripes on {background}"
    words = shape_words.split()
    return f"{_with_article(' '.join(words[:-1] + [colour_name, words[-1]]))} on {background}"


def _write_atomic(path: str, write) -> None:
    folder = os.path.dirname(path)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _write_text(path: str, text: str) -> None:
    def write(target: str) -> None:
        with open(target, "w", encoding="utf-8") as stream:
            stream.write(text + "\n")

    _write_atomic(path, write)


def make_sample_images(out_dir: str, count: int = 24, seed: int = 0) -> list[str]:
    """Write ``count`` shape images with captions into ``out_dir``; return the image paths in order."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for index in range(count):
        size = SIZES[index % len(SIZES)]
        shape = SHAPES[index % len(SHAPES)]
        colour_name, background_name = rng.sample(sorted(COLOURS), 2)
        image = Image.new("RGB", size, COLOURS[background_name])
        shape_words = _draw_shape(ImageDraw.Draw(image), shape, size, COLOURS[colour_name], rng)
        extension = "png" if index % 3 else "jpg"
        path = os.path.join(out_dir, f"shape_{index:03d}.{extension}")
        _write_atomic(path, lambda target: image.save(target, format="PNG" if extension == "png" else "JPEG",
                                                      quality=95))
        _write_text(os.path.splitext(path)[0] + ".txt", _caption(shape_words, colour_name, background_name))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate a small captioned set of coloured-shape images.")
    parser.add_argument("out", help="folder to write the images and .txt captions into")
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = make_sample_images(args.out, count=args.count, seed=args.seed)
    print(f"wrote {len(paths)} images with captions to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
