"""Conditioning datasets at run time: control images and loss masks paired with training images.

Every training image is paired with the file of the same relative path in
each linked conditioning dataset; the extension may differ (``a/photo.jpg``
pairs with ``a/photo.png``). A training image without its conditioning file
stops the run with the files named.

A conditioning image is resized and cropped with exactly its training
image's plan, so it lands in the same bucket with the same crop. One stored
at another size (same aspect ratio) is first scaled to the training image's
size. The conditioning dataset's own resolution and crop keys are not used.

- controlnet: the ControlNet's control input. SD-style ControlNets read the
  image (``TrainingBatch.conditioning_pixels``, loaded per batch); MMDiT
  ControlNets read its VAE latents (``conditioning_latents``), cached in the
  conditioning dataset's ``cache_dir_vae`` like training latents.
- mask: a loss mask, white = learn, black = ignore (``TrainingBatch.loss_mask``),
  used for a batch with probability ``masked_loss_probability``.

With several linked datasets of one type, each sample uses one of them,
drawn with the batch's generator (conditioning_multidataset_sampling=random).
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from PIL import Image

from simpletuner.caching.store import TensorStore
from simpletuner.caching.vae import LatentCache
from simpletuner.data.conditioning_config import CONTROLNET, MASK, conditioning_links, conditioning_type
from simpletuner.data.dataset_config import DatasetConfigError
from simpletuner.data.discovery import IMAGE_EXTENSIONS
from simpletuner.data.transforms import apply_plan, load_image, to_tensor
from simpletuner.data.types import ImageRecord

if TYPE_CHECKING:
    from simpletuner.data.conditioning_batches import ConditioningSource

ASPECT_TOLERANCE = 0.02  # relative aspect-ratio difference accepted between an image and its conditioning image
_MISSING_SHOWN = 10


class ConditioningError(DatasetConfigError):
    def __init__(self, message: str):
        super().__init__([message])


@dataclass
class ConditioningSet:
    """One opened conditioning dataset and its pairing with each image dataset that links it."""

    spec: object
    storage: object
    kind: str  # CONTROLNET or MASK
    available: list[str]
    pairs: dict[str, dict[str, str]] = field(default_factory=dict)  # image dataset id -> training path -> own path
    stamps: dict[str, str] = field(default_factory=dict)  # own path -> file stamp (latent cache keys)
    latent_cache: LatentCache | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    def record_for(self, record: ImageRecord) -> ImageRecord:
        """The conditioning image of ``record`` with ``record``'s resize/crop plan."""
        path = self.pairs[record.dataset_id][record.path]
        return dataclasses.replace(record, dataset_id=self.id, path=path, captions=(), is_regularisation=False,
                                   source_stamp=self.stamps.get(path, ""))


def match_files(training_paths: list[str], available: list[str]) -> tuple[dict[str, str], list[str]]:
    """Training path -> conditioning path (same relative path, else same path with another extension); and misses."""
    exact = set(available)
    by_stem: dict[str, str] = {}
    for path in sorted(available):
        by_stem.setdefault(os.path.splitext(path)[0], path)
    pairs, missing = {}, []
    for path in training_paths:
        match = path if path in exact else by_stem.get(os.path.splitext(path)[0])
        if match is None:
            missing.append(path)
        else:
            pairs[path] = match
    return pairs, missing


def _missing_message(conditioning: ConditioningSet, image_id: str, missing: list[str]) -> str:
    shown = ", ".join(missing[:_MISSING_SHOWN])
    more = f" and {len(missing) - _MISSING_SHOWN} more" if len(missing) > _MISSING_SHOWN else ""
    return (f"{conditioning.spec.where()}: no conditioning image for {len(missing)} training image(s) of dataset "
            f"'{image_id}': {shown}{more}. Looked in {conditioning.storage.root} for the same relative path "
            "(any image extension). Add the missing files there, or remove those training images.")


# --- loading one conditioning image --------------------------------------------------------------
def load_aligned(record: ImageRecord, storage) -> Image.Image:
    """The image of a ``ConditioningSet.record_for`` record, resized and cropped like its training image."""
    image = load_image(storage, record.path)
    width, height = record.original_size
    if image.size != (width, height):
        ratio, wanted = image.width / image.height, width / height
        if abs(ratio - wanted) > ASPECT_TOLERANCE * wanted:
            raise ConditioningError(
                f"{storage.describe(record.path)} is {image.width}x{image.height}, but its training image is "
                f"{width}x{height}: a conditioning image needs its training image's aspect ratio (it is scaled to "
                "that size and cropped the same way). Regenerate it from the training image.")
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    return apply_plan(image, record)


def load_control_pixels(record: ImageRecord, storage) -> torch.Tensor:
    """(3, H, W) in [-1, 1]."""
    return to_tensor(load_aligned(record, storage))


def load_mask(record: ImageRecord, storage) -> torch.Tensor:
    """(1, H, W) in [0, 1]: the image's brightness, 1 where it is white."""
    pixels = to_tensor(load_aligned(record, storage))
    return ((pixels.mean(dim=0, keepdim=True) + 1.0) / 2.0).clamp(0.0, 1.0)


# --- opening --------------------------------------------------------------------------------------
@dataclass
class ConditioningData:
    """Every conditioning dataset of a run, paired with the image datasets that link it."""

    links: dict[str, list[ConditioningSet]]  # image dataset id -> its conditioning sets
    control_input: str | None  # "pixels" / "latents" when a ControlNet trains, else None

    def sets(self) -> list[ConditioningSet]:
        unique: dict[str, ConditioningSet] = {}
        for linked in self.links.values():
            for conditioning in linked:
                unique.setdefault(conditioning.id, conditioning)
        return list(unique.values())

    def cached_sets(self) -> list[ConditioningSet]:
        return [s for s in self.sets() if s.latent_cache is not None]

    def clear_latents(self, image_id: str) -> int:
        """Remove the cached control latents of the conditioning datasets ``image_id`` links (new crops each epoch)."""
        return sum(c.latent_cache.clear() for c in self.links.get(image_id, []) if c.latent_cache is not None)

    def _records_of(self, conditioning: ConditioningSet, indexes: dict) -> list[ImageRecord]:
        return [conditioning.record_for(record) for image_id in conditioning.pairs
                for record in indexes[image_id].records]

    def build_latents(self, family, indexes: dict, batch_size: int, progress: bool = True) -> None:
        """Encode the missing control latents of every training image (indexes: image dataset id -> DatasetIndex)."""
        for conditioning in self.cached_sets():
            report = conditioning.latent_cache.build(self._records_of(conditioning, indexes), conditioning.storage,
                                                     family.encode_images, batch_size, progress=progress,
                                                     load_fn=load_control_pixels)
            if report.failed:
                listed = "; ".join(f"{conditioning.storage.describe(r.path)}: {r.reason}" for r in report.failed[:5])
                raise ConditioningError(f"{conditioning.spec.where()}: {len(report.failed)} conditioning image(s) "
                                        f"could not be encoded ({listed}). Fix or replace those files.")

    def report_lines(self, indexes: dict) -> list[str]:
        lines = []
        for conditioning in self.sets():
            linked = ", ".join(sorted(conditioning.pairs))
            lines.append(f"conditioning '{conditioning.id}' ({conditioning.kind}, {conditioning.storage.root}): "
                         f"paired with {linked}")
            if conditioning.latent_cache is not None:
                plan = conditioning.latent_cache.plan(self._records_of(conditioning, indexes))
                lines.append(f"  control latents ({conditioning.latent_cache.store.storage.root}): {plan.summary()}")
        return lines

    def source(self, settings, family, encode_missing: bool, cache_disabled: bool) -> "ConditioningSource":
        from simpletuner.data.conditioning_batches import ConditioningSource

        return ConditioningSource(self, settings, family, encode_missing, cache_disabled)


def open_conditioning(specs: list, indexes: dict, settings, fingerprint: str | None) -> ConditioningData | None:
    """Pair the training images of ``indexes`` (image dataset id -> DatasetIndex) with their conditioning files.

    Raises ConditioningError naming the training images that have no conditioning file.
    """
    from simpletuner.models.controlnets import LATENTS, control_input_for

    links = {image_id: linked for image_id, linked in conditioning_links(specs).items() if image_id in indexes}
    if not links:
        return None
    control_input = control_input_for(settings)
    opened: dict[str, ConditioningSet] = {}
    problems: list[str] = []
    for image_id, linked in links.items():
        paths = [record.path for record in indexes[image_id].records]
        for spec in linked:
            conditioning = opened.get(spec.id) or _open_set(spec, settings)
            opened[spec.id] = conditioning
            conditioning.pairs[image_id], missing = match_files(paths, conditioning.available)
            if missing:
                problems.append(_missing_message(conditioning, image_id, missing))
    if problems:
        raise DatasetConfigError(problems)
    if control_input == LATENTS and fingerprint is not None:
        for conditioning in opened.values():
            if conditioning.kind == CONTROLNET:
                _attach_latent_cache(conditioning, specs, settings, fingerprint)
    return ConditioningData({image_id: [opened[spec.id] for spec in linked] for image_id, linked in links.items()},
                            control_input)


def _open_set(spec, settings) -> ConditioningSet:
    from simpletuner.data.storage.factory import make_storage

    storage = make_storage(spec, settings, "data")
    available = storage.list_files(extensions=IMAGE_EXTENSIONS)
    if not available:
        raise ConditioningError(f"{spec.where()}: no image files ({', '.join(IMAGE_EXTENSIONS)}) were found in "
                                f"{storage.root}; check instance_data_dir / aws_data_prefix.")
    kind = conditioning_type(spec)
    if kind not in (CONTROLNET, MASK):
        raise ConditioningError(f"{spec.where()}: conditioning_type {kind!r} is not implemented yet; use controlnet "
                                "or mask.")
    return ConditioningSet(spec, storage, kind, available)


def _attach_latent_cache(conditioning: ConditioningSet, specs: list, settings, fingerprint: str) -> None:
    from simpletuner.data.storage.factory import make_storage

    paths = sorted({path for pairs in conditioning.pairs.values() for path in pairs.values()})
    workers = max(1, min(int(getattr(settings, "max_workers", 8) or 8), 16))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        conditioning.stamps = dict(zip(paths, pool.map(conditioning.storage.stamp, paths)))
    store = TensorStore(make_storage(conditioning.spec, settings, "vae_cache", datasets=specs),
                        compress=bool(getattr(settings, "compress_disk_cache", False)))
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in conditioning.id)
    conditioning.latent_cache = LatentCache(store, fingerprint, name=f"control-latents-{safe}")
