"""Validation renders of a ControlNet run: the ControlNet pipeline and the control image it renders from.

The trained model is a ``ControlledDenoiser`` (frozen denoiser + ControlNet).
Its renders go through the family's diffusers ControlNet pipeline
(``ControlNetKind.pipeline_class``), made from the family's text-to-image
pipeline with the ControlNet added. The pipelines share the live modules, so
every round renders the current weights.

Every prompt renders from one control image, chosen the same way on every
start: the conditioning image paired with the first training image (by path)
of the first image dataset that links a ControlNet conditioning dataset. For
each validation size it is scaled to cover that size and centre-cropped, and
it is shown beside the renders at validation_stitch_input_location.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from PIL import Image

from simpletuner.config.errors import ConfigError
from simpletuner.models.pipeline_rebuild import rebuilt_pipeline
from simpletuner.models.controlnets import controlnet_kind
from simpletuner.training.controlnet_model import ControlledDenoiser


def controlled_denoiser(denoiser: torch.nn.Module) -> ControlledDenoiser | None:
    """The ControlledDenoiser behind ``denoiser`` (also through a torch.compile wrapper), or None."""
    module = getattr(denoiser, "_orig_mod", denoiser)
    return module if isinstance(module, ControlledDenoiser) else None


def render_pipeline_class(settings, family):
    """The diffusers pipeline class validation renders with: the ControlNet pipeline in a ControlNet run,
    the channel-control pipeline (FluxControlPipeline, InstructPix2Pix) in a control=true run."""
    if settings.control:
        from simpletuner.training.channel_control import control_pipeline_class

        return control_pipeline_class(family.name)
    if not settings.controlnet:
        return family.pipeline_class
    return controlnet_kind(family.name).pipeline()


def controlnet_pipeline(pipeline, controlled: ControlledDenoiser):
    """The family's ControlNet pipeline over ``pipeline``'s modules and settings plus ``controlled``'s ControlNet."""
    return rebuilt_pipeline(pipeline, controlled.kind.pipeline(), controlnet=controlled.controlnet)


def cover_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` scaled to cover width x height, then cropped to it around the centre."""
    scale = max(width / image.width, height / image.height)
    scaled = (max(width, math.ceil(image.width * scale)), max(height, math.ceil(image.height * scale)))
    if scaled != image.size:
        image = image.resize(scaled, resample=Image.Resampling.LANCZOS)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


@dataclass
class ControlImage:
    image: Image.Image  # the conditioning file as stored
    source: str  # "<conditioning dataset>:<path>:<file stamp>", for logs and benchmark fingerprints
    _sized: dict[tuple[int, int], Image.Image] = field(default_factory=dict, repr=False)

    def at(self, width: int, height: int) -> Image.Image:
        """The control image at a render size (made once per size)."""
        if (width, height) not in self._sized:
            self._sized[(width, height)] = cover_crop(self.image, width, height)
        return self._sized[(width, height)]


def first_control_image(conditioning, indexes: dict) -> ControlImage:
    """The validation control image of a run (``conditioning``: the data pipeline's ConditioningData or None)."""
    from simpletuner.data.conditioning_config import CONTROLNET
    from simpletuner.data.transforms import load_image

    for image_id, linked in (conditioning.links.items() if conditioning is not None else ()):
        control_sets = [candidate for candidate in linked if candidate.kind == CONTROLNET]
        records = sorted(indexes[image_id].records, key=lambda record: record.path) if image_id in indexes else []
        if not control_sets or not records:
            continue
        control_set = control_sets[0]
        path = control_set.pairs[image_id][records[0].path]
        stamp = control_set.stamps.get(path) or control_set.storage.stamp(path)
        return ControlImage(load_image(control_set.storage, path), f"{control_set.id}:{path}:{stamp}")
    raise ConfigError("controlnet", "validation of a ControlNet run renders from a training image's control image, "
                                    "but no training image has one; link a ControlNet conditioning dataset "
                                    "(conditioning_data) to an image dataset, or set validation_disable=true.")


@dataclass
class ControlRenders:
    """What a ControlNet run's renders add: the ControlNet pipeline and the control image argument."""

    controlled: ControlledDenoiser
    image: ControlImage

    @property
    def denoiser(self) -> torch.nn.Module:
        """What the family's own pipeline is built over: the frozen denoiser beside the ControlNet."""
        return self.controlled.denoiser

    def pipeline(self, pipeline):
        return controlnet_pipeline(pipeline, self.controlled)

    def inputs(self, width: int, height: int) -> dict[str, Image.Image]:
        return {self.controlled.kind.image_argument: self.image.at(width, height)}

    @staticmethod
    @contextmanager
    def seeded(seed: int, device: torch.device) -> Iterator[None]:
        """The global RNG seeded for one render, and restored afterwards.

        StableDiffusion3ControlNetPipeline samples the control image's VAE
        latents from the global RNG rather than the render's generator; this
        keeps its renders repeatable and the training RNG untouched.
        """
        device = torch.device(device)
        devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield


@dataclass
class ChannelControlRenders:
    """What a control=true run's renders add: the channel-control pipeline over the widened denoiser, and
    the control image argument (training/channel_control.py)."""

    denoiser: torch.nn.Module
    image: ControlImage
    family_name: str

    def pipeline(self, pipeline):
        from simpletuner.training.channel_control import control_pipeline_class

        return rebuilt_pipeline(pipeline, control_pipeline_class(self.family_name))

    def inputs(self, width: int, height: int) -> dict[str, Image.Image]:
        from simpletuner.training.channel_control import channel_control_kind

        return {channel_control_kind(self.family_name).image_argument: self.image.at(width, height)}

    seeded = staticmethod(ControlRenders.seeded)  # renders repeatable, the training RNG untouched
