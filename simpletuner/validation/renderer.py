"""Rendering validation images with the family's pipelines over the live denoiser.

A ``Renderer`` builds the text-to-image pipeline at once and the family's
image-to-image pipeline when a prompt first brings an input image
(validation_using_datasets). Each pipeline gets the sampling arguments it
accepts; img2img renders keep their input's size and the pipeline's own
default strength. Image ``index`` draws its noise from seed ``seed + index``.
A ControlNet run renders with the family's ControlNet pipeline and a control
image (``control.ControlRenders``); a control=true run with the family's
channel-control pipeline and a control image (``control.ChannelControlRenders``).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from PIL import Image

from simpletuner.config.errors import ConfigError
from simpletuner.validation.cfg_delay import DelayedTrueCfg, delayed_steps
from simpletuner.validation.control import ChannelControlRenders, ControlImage, ControlRenders, controlled_denoiser
from simpletuner.validation.images import RenderKey, generator_device
from simpletuner.validation.prompts import ValidationPrompt
from simpletuner.validation.sampling import call_arguments, pipeline_arguments
from simpletuner.validation.schedulers import validation_scheduler


class _Sampler:
    """One pipeline and the arguments every render with it passes (not prompt, size, image or generator)."""

    def __init__(self, pipeline, family, settings):
        self.pipeline = pipeline
        self.accepted = pipeline_arguments(type(pipeline))
        arguments = {**family.pipeline_call_arguments(), **call_arguments(settings, type(pipeline))}
        self.arguments = {name: value for name, value in arguments.items() if name in self.accepted}
        steps = delayed_steps(settings, type(pipeline))
        self.delay = DelayedTrueCfg(steps) if steps else None
        self.denoiser_attribute = family.denoiser_subfolder
        self.rendered_image = family.rendered_image  # picks the image out of the pipeline's output

    def run(self, prompt: str, inputs: dict, generator: torch.Generator, autocast) -> Image.Image:
        arguments = {**self.arguments, **{name: value for name, value in inputs.items() if name in self.accepted}}
        delayed = nullcontext()
        if self.delay is not None:
            arguments["callback_on_step_end"] = self.delay.step_done
            delayed = self.delay.installed(getattr(self.pipeline, self.denoiser_attribute))
        with torch.no_grad(), autocast(), delayed:
            result = self.pipeline(prompt=prompt, generator=generator, output_type="pil", **arguments)
        return self.rendered_image(result)


class Renderer:
    def __init__(self, family, denoiser: torch.nn.Module, settings, device: torch.device, seed: int, autocast,
                 control_image: ControlImage | None = None):
        """``control_image`` is required when ``denoiser`` is a ControlNet run's ControlledDenoiser."""
        self.family = family
        self.denoiser = denoiser
        self.control = _control_renders(denoiser, control_image, family, settings)
        self.settings = settings
        self.device = device
        self.generator_device = generator_device(settings, device)
        self.seed = seed
        self.autocast = autocast  # a callable returning the accelerator's autocast context
        self.text_to_image = self._sampler(img2img=False)
        self._image_to_image: _Sampler | None = None

    @property
    def pipeline(self):
        return self.text_to_image.pipeline

    def _sampler(self, img2img: bool) -> _Sampler:
        extra = {"img2img": True} if img2img else {}
        if self.control is None:
            pipeline = self.family.build_pipeline(denoiser=self.denoiser, **extra)
        elif img2img:
            raise ConfigError("validation_using_datasets", "image-to-image validation renders are not implemented "
                                                           "for ControlNet runs; turn validation_using_datasets off.")
        else:
            pipeline = self.control.pipeline(self.family.build_pipeline(denoiser=self.control.denoiser))
        scheduler = validation_scheduler(self.settings.validation_noise_scheduler, pipeline.scheduler,
                                         bool(self.family.flow_matching))
        if scheduler is not None:
            pipeline.scheduler = scheduler
        pipeline.set_progress_bar_config(disable=True)
        return _Sampler(pipeline, self.family, self.settings)

    @property
    def image_to_image(self) -> _Sampler:
        if self._image_to_image is None:
            self._image_to_image = self._sampler(img2img=True)
        return self._image_to_image

    def render(self, prompt: ValidationPrompt, key: RenderKey) -> Image.Image:
        generator = torch.Generator(device=self.generator_device).manual_seed(self.seed + key.index)
        inputs = {"width": key.width, "height": key.height}
        sampler = self.text_to_image
        if self.control is not None:
            inputs.update(self.control.inputs(key.width, key.height))
        if prompt.input_image is not None:
            sampler = self.image_to_image
            inputs["image"] = prompt.input_image
        seeded = self.control.seeded(self.seed + key.index, self.device) if self.control else nullcontext()
        with seeded:
            return sampler.run(prompt.text, inputs, generator, self.autocast)


def _control_renders(denoiser: torch.nn.Module, control_image: ControlImage | None, family,
                     settings) -> ControlRenders | ChannelControlRenders | None:
    if settings.control:
        if control_image is None:
            raise ValueError("rendering a control=true run needs a control image")
        return ChannelControlRenders(denoiser, control_image, family.name)
    controlled = controlled_denoiser(denoiser)
    if controlled is None:
        if control_image is not None:
            raise ValueError("a control image was given, but the denoiser has no ControlNet to read it")
        return None
    if control_image is None:
        raise ValueError("rendering with a ControlNet needs a control image")
    return ControlRenders(controlled, control_image)
