"""Typed records that flow from dataset discovery to the trainer.

These are the contracts between data/, caching/ and training/: discovery
produces ``ImageRecord``s grouped in a ``DatasetIndex``; the sampler yields
lists of records; the batch assembler turns them into a ``TrainingBatch``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ImageRecord:
    """One training image and every decision made about it before caching.

    Sizes are (width, height) in pixels. The crop offset is decided once at
    discovery time (also for crop_style=random) and stored, so latents cached
    from a record are reproducible.
    """

    dataset_id: str
    path: str  # storage-relative path of the image
    captions: tuple[str, ...]  # one or more candidate captions (textfile may hold several lines)
    original_size: tuple[int, int]
    intermediate_size: tuple[int, int]  # after resize, before crop
    crop_offset: tuple[int, int]  # (top, left) in the intermediate image
    target_size: tuple[int, int]  # the bucket: final (width, height) fed to the VAE
    is_regularisation: bool = False
    source_stamp: str = ""  # size+mtime or etag: changes when the file changes

    @property
    def bucket(self) -> str:
        return f"{self.target_size[0]}x{self.target_size[1]}"

    @property
    def sample_id(self) -> str:
        return f"{self.dataset_id}:{self.path}"


@dataclass(frozen=True)
class Rejection:
    path: str
    reason: str


@dataclass
class DatasetIndex:
    """What discovery found in one image dataset."""

    dataset_id: str
    records: list[ImageRecord] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    files_seen: int = 0

    def buckets(self) -> dict[str, list[ImageRecord]]:
        grouped: dict[str, list[ImageRecord]] = {}
        for record in self.records:
            grouped.setdefault(record.bucket, []).append(record)
        return grouped


@dataclass
class TrainingBatch:
    """One step's inputs for a model family.

    ``text`` holds whatever the family's ``encode_text`` returned, stacked on
    the batch dimension (for example prompt_embeds and pooled_prompt_embeds).
    Sizes are (height, width) here because that is what diffusers'
    micro-conditioning expects.
    """

    latents: torch.Tensor
    text: dict[str, torch.Tensor]
    original_sizes: list[tuple[int, int]]
    crop_coords: list[tuple[int, int]]  # (top, left)
    target_sizes: list[tuple[int, int]]
    sample_ids: list[str]
    loss_mask: torch.Tensor | None = None  # (B, 1, H, W) pixel-space weights, 1 = learn (mask conditioning)
    # A ControlNet's control input (conditioning datasets): the paired images in [-1, 1], or their VAE latents.
    conditioning_pixels: torch.Tensor | None = None
    conditioning_latents: torch.Tensor | None = None
    # The caption chosen for each sample ("" when dropped): families re-encode these when text encoders train.
    captions: list[str] | None = None

    @property
    def size(self) -> int:
        return self.latents.shape[0]

    def to(self, device, dtype=None) -> "TrainingBatch":
        def move(t):
            if t is None:
                return None
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return TrainingBatch(
            latents=move(self.latents),
            text={k: move(v) for k, v in self.text.items()},
            original_sizes=self.original_sizes,
            crop_coords=self.crop_coords,
            target_sizes=self.target_sizes,
            sample_ids=self.sample_ids,
            loss_mask=move(self.loss_mask),
            conditioning_pixels=move(self.conditioning_pixels),
            conditioning_latents=move(self.conditioning_latents),
            captions=self.captions,
        )
