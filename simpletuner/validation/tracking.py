"""Sending validation images and evaluation numbers to the run's trackers (report_to)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def log_scalars(accelerator, values: dict[str, float], step: int) -> None:
    if values:
        accelerator.log(values, step=step)


def log_images(accelerator, images: dict[str, list[Image.Image]], step: int, layout: str = "gallery") -> None:
    """Images grouped by tag (one tag per prompt and size, so a group's images share a size).

    TensorBoard gets an image grid per tag. wandb gets, per tracker_image_layout, a gallery
    (one image list per tag) or one table with a row per image. Other trackers with
    ``log_images`` get the lists; trackers without image support get nothing.
    """
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for tag, group in images.items():
                batch = np.stack([np.asarray(image.convert("RGB")) for image in group])
                tracker.writer.add_images(tag, batch, global_step=step, dataformats="NHWC")
            tracker.writer.flush()
        elif tracker.name == "wandb" and layout == "table":
            tracker.log({"validation": _wandb_table(images)}, step=step)
        elif hasattr(tracker, "log_images"):
            tracker.log_images(images, step=step)


def _wandb_table(images: dict[str, list[Image.Image]]):
    import wandb

    table = wandb.Table(columns=["tag", "index", "image"])
    for tag, group in images.items():
        for index, image in enumerate(group):
            table.add_data(tag, index, wandb.Image(image))
    return table
