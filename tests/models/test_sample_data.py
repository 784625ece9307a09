"""The generated demo image set."""

import os
import subprocess
import sys

from PIL import Image

from simpletuner.demo.sample_data import COLOURS, make_sample_images


def test_images_and_captions(tmp_path):
    paths = make_sample_images(str(tmp_path), count=24, seed=0)
    assert len(paths) == 24
    shapes_seen, orientations = set(), set()
    for path in paths:
        with Image.open(path) as image:
            width, height = image.size
            assert image.format in ("PNG", "JPEG")
        assert 64 <= width <= 160 and 64 <= height <= 160
        orientations.add((width > height) - (width < height))
        with open(os.path.splitext(path)[0] + ".txt", encoding="utf-8") as handle:
            caption = handle.read().strip()
        assert caption.endswith("background")
        words = caption.split()
        assert sum(word in COLOURS for word in words) == 2, caption  # shape colour and background colour
        shapes_seen.update(w for w in words if w in ("circle", "square", "triangle", "stripes"))
    assert orientations == {-1, 0, 1}  # portrait, square and landscape
    assert shapes_seen == {"circle", "square", "triangle", "stripes"}
    assert {os.path.splitext(p)[1] for p in paths} == {".png", ".jpg"}
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]


def test_same_seed_same_files_other_seed_differs(tmp_path):
    first = make_sample_images(str(tmp_path / "a"), count=6, seed=3)
    again = make_sample_images(str(tmp_path / "b"), count=6, seed=3)
    other = make_sample_images(str(tmp_path / "c"), count=6, seed=4)

    def contents(paths):
        return [open(p, "rb").read() for p in paths]

    assert contents(first) == contents(again)
    assert contents(first) != contents(other)


def test_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "simpletuner.demo.sample_data", str(tmp_path), "--count", "5"],
                            check=True, capture_output=True, text=True)
    assert "5 images" in result.stdout
    assert len([name for name in os.listdir(tmp_path) if name.endswith(".txt")]) == 5
