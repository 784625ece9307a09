"""Session-wide test inputs: the sample images and the tiny models, each made once and shared read-only.

A test never trains on the shared folders themselves: dataset discovery saves its bucket index beside the
images, and a test that rewrote a model would change it for every later test. The ``images`` fixture gives
each module its own copy of the images; a test that writes into a model copies its folder first. Both shared
folders are checked at the end of the session, and a change is reported as an error naming the files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.images import copy_sample_images

SAMPLE_IMAGE_COUNT = 6


def folder_snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime in ns) of every entry below ``folder``."""
    folder = Path(folder)
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in folder.rglob("*")}


def changed_entries(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    return sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))


class ReadOnlyFolders:
    """Remembers shared folders as they were made, to report any that a test changed."""

    def __init__(self):
        self.snapshots: dict[Path, dict[str, tuple[int, int]]] = {}

    def add(self, folder: Path) -> None:
        self.snapshots[Path(folder)] = folder_snapshot(folder)

    def check(self) -> None:
        problems = [f"{folder}: {', '.join(changes[:5])}"
                    for folder, before in self.snapshots.items()
                    if (changes := changed_entries(before, folder_snapshot(folder)))]
        assert not problems, ("tests changed shared read-only folders (copy a folder before writing into it):\n"
                              + "\n".join(problems))


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> Path:
    """Six captioned shape images (make_sample_images, seed 0). Read-only: train on a copy (``images``)."""
    from simpletuner.demo.sample_data import make_sample_images

    folder = tmp_path_factory.mktemp("sample-images")
    make_sample_images(str(folder), count=SAMPLE_IMAGE_COUNT)
    guard = ReadOnlyFolders()
    guard.add(folder)
    yield folder
    guard.check()


@pytest.fixture(scope="module")
def images(request, sample_images, tmp_path_factory) -> Path:
    """This module's own copy of the first IMAGE_COUNT sample images (a module constant; all six when unset).

    Training runs may write into it (the bucket index); the module's tests share it, as one folder.
    """
    count = getattr(request.module, "IMAGE_COUNT", SAMPLE_IMAGE_COUNT)
    return copy_sample_images(sample_images, tmp_path_factory.mktemp("images"), count)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(family) -> folder`` of that family's tiny random-weight pipeline, built once per session.

    Read-only: a test that writes into the model copies the folder first.
    """
    from simpletuner.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, str] = {}
    guard = ReadOnlyFolders()

    def model(family: str) -> str:
        if family not in built:
            built[family] = build_tiny(family, str(root / family))
            guard.add(Path(built[family]))
        return built[family]

    yield model
    guard.check()
