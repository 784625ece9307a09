"""tracker_image_layout decides how wandb receives validation images."""

from __future__ import annotations

from types import SimpleNamespace

from PIL import Image

from simpletuner.validation.tracking import log_images


class RecordingWandb:
    name = "wandb"

    def __init__(self):
        self.logged, self.galleries = [], []

    def log(self, values, step):
        self.logged.append((values, step))

    def log_images(self, images, step):
        self.galleries.append((images, step))


def test_table_layout_sends_one_row_per_image_and_gallery_sends_lists():
    import wandb

    images = {"validation/a_64x64": [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), "red")],
              "validation/b_64x64": [Image.new("RGB", (8, 8), "blue")]}
    tracker = RecordingWandb()
    accelerator = SimpleNamespace(trackers=[tracker])
    log_images(accelerator, images, step=5, layout="table")
    ((values, step),) = tracker.logged
    table = values["validation"]
    assert step == 5 and isinstance(table, wandb.Table) and len(table.data) == 3
    assert [row[0] for row in table.data] == ["validation/a_64x64", "validation/a_64x64", "validation/b_64x64"]
    assert not tracker.galleries
    log_images(accelerator, images, step=6, layout="gallery")
    assert tracker.galleries == [(images, 6)] and len(tracker.logged) == 1
