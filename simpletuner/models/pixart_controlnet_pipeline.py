"""Rendering PixArt Sigma with a ``PixArtControlNetModel``: PixArtSigmaPipeline plus ``control_image``.

Usage (see documentation/CONTROLNET.md)::

    controlnet = PixArtControlNetModel.from_pretrained("output/controlnet")
    pipeline = PixArtSigmaControlNetPipeline.from_pretrained(base_model, controlnet=controlnet)
    image = pipeline("a lighthouse", control_image=edges, controlnet_conditioning_scale=0.8).images[0]

Everything else is PixArtSigmaPipeline's own sampling: on every transformer
call the ControlNet reads the same inputs plus the control image's VAE
latents, and its residuals are added after the matching transformer blocks.
The control image is encoded at the size the latents actually have, so it
also follows ``use_resolution_binning``.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterator

import torch
from diffusers import PixArtSigmaPipeline

from simpletuner.models.pixart_controlnet import PixArtControlNetModel, block_residuals_added, controlnet_residuals


class PixArtSigmaControlNetPipeline(PixArtSigmaPipeline):
    model_cpu_offload_seq = "text_encoder->controlnet->transformer->vae"

    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler, controlnet: PixArtControlNetModel):
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                         scheduler=scheduler)
        self.register_modules(controlnet=controlnet)

    def __call__(self, *args, control_image=None, controlnet_conditioning_scale: float = 1.0, **kwargs):
        """PixArtSigmaPipeline's call, steered by ``control_image`` (one image, or one per generated image)."""
        if control_image is None:
            raise ValueError("PixArtSigmaControlNetPipeline needs control_image= (the image the ControlNet reads)")
        with self._steered(control_image, float(controlnet_conditioning_scale)):
            return super().__call__(*args, **kwargs)

    @contextmanager
    def _steered(self, control_image, scale: float) -> Iterator[None]:
        """Hooks on the transformer that run the ControlNet before each call and add its residuals in it."""
        encoded: dict[tuple, torch.Tensor] = {}
        open_residuals = []

        def before(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            key = tuple(hidden.shape[-2:])
            if key not in encoded:
                encoded[key] = self.control_latents(control_image, *key)
            control = _batched(encoded[key], hidden.shape[0]).to(hidden.device)
            context = block_residuals_added(module, controlnet_residuals(self.controlnet, control, args, kwargs,
                                                                         scale))
            context.__enter__()
            open_residuals.append(context)

        def after(module, args, kwargs, output):
            open_residuals.pop().__exit__(None, None, None)

        handles = [self.transformer.register_forward_pre_hook(before, with_kwargs=True),
                   self.transformer.register_forward_hook(after, with_kwargs=True)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            while open_residuals:  # a transformer call that raised
                open_residuals.pop().__exit__(None, None, None)

    @torch.no_grad()
    def control_latents(self, control_image, latent_height: int, latent_width: int) -> torch.Tensor:
        """The control image(s) as scaled VAE latents (posterior mean) of the given latent size.

        Made the way training caches them: pixels in [-1, 1], VAE mean, minus any
        shift, times the scaling factor.
        """
        pixels = self.image_processor.preprocess(control_image, height=latent_height * self.vae_scale_factor,
                                                 width=latent_width * self.vae_scale_factor)
        latents = self.vae.encode(pixels.to(device=self._execution_device, dtype=self.vae.dtype)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor


def _with_control_arguments(call) -> inspect.Signature:
    """PixArtSigmaPipeline.__call__'s signature plus the control keywords, so callers that read the signature to
    decide what to pass (validation renders do) see every argument this pipeline takes."""
    inherited = inspect.signature(call)
    control = [inspect.Parameter("control_image", inspect.Parameter.KEYWORD_ONLY, default=None),
               inspect.Parameter("controlnet_conditioning_scale", inspect.Parameter.KEYWORD_ONLY, default=1.0,
                                 annotation=float)]
    named = [p for p in inherited.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in inherited.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    return inherited.replace(parameters=[*named, *control, *rest])


PixArtSigmaControlNetPipeline.__call__.__signature__ = _with_control_arguments(PixArtSigmaPipeline.__call__)


def _batched(latents: torch.Tensor, batch: int) -> torch.Tensor:
    """Control latents for a transformer batch: one image for all, or one per image (repeated for CFG halves)."""
    count = latents.shape[0]
    if count == 1:
        return latents.expand(batch, -1, -1, -1)
    if batch % count:
        raise ValueError(f"{count} control images do not fit a batch of {batch} latents; give one control image, "
                         "or one per generated image")
    return latents.repeat(batch // count, 1, 1, 1)
