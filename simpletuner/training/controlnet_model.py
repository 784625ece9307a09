"""Building a ControlNet beside the denoiser, and running the two together.

``ControlledDenoiser`` takes the denoiser's place in ``Components``: a family
calls it exactly like its denoiser, plus the keyword ``control`` (the batch's
control pixels or latents, see ``ModelFamily.control_kwargs``). It runs the
ControlNet on the same inputs and hands its outputs to the frozen denoiser
the way the matching ControlNet pipeline does (diffusers' own, or for PixArt
models/pixart_controlnet_pipeline.py), so what is trained is what that
pipeline renders with. New ControlNets come from controlnet_builders.py.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from simpletuner.config.errors import ConfigError
from simpletuner.models.controlnets import ControlNetKind, controlnet_kind, custom_config
from simpletuner.training.controlnet_builders import controlnet_from_denoiser

logger = logging.getLogger("simpletuner.controlnet")

CONTROLNET_EXTRA = "controlnet"  # Components.extras key of the ControlNet built before quantization


# --- how each denoiser type takes a ControlNet's outputs ----------------------------------------
def _unet_residuals(controlnet, control, args: tuple, kwargs: dict, latent_shift: float) -> dict:
    """SD 1.x/2.x/XL: the ControlNet reads the image in [0, 1]; its outputs join the UNet's skip connections."""
    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    down, middle = controlnet(sample, timestep, encoder_hidden_states=kwargs["encoder_hidden_states"],
                              controlnet_cond=((control + 1.0) / 2.0).to(sample.dtype),
                              added_cond_kwargs=kwargs.get("added_cond_kwargs"), return_dict=False)
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": middle}


def _sd3_residuals(controlnet, control, args: tuple, kwargs: dict, latent_shift: float) -> dict:
    """SD3: the ControlNet reads the control latents; its block outputs are added to the transformer's blocks.

    A ControlNet with force_zeros_for_pooled_projection (InstantX style) gets zero pooled text and latents
    without the VAE shift, as StableDiffusion3ControlNetPipeline gives it.
    """
    config = controlnet.config
    hidden = kwargs["hidden_states"]
    pooled = kwargs["pooled_projections"]
    control = control.to(hidden.dtype)
    if config.force_zeros_for_pooled_projection:
        pooled = torch.zeros_like(pooled)
        control = control + latent_shift
    text = kwargs["encoder_hidden_states"] if config.joint_attention_dim is not None else None
    samples = controlnet(hidden_states=hidden, controlnet_cond=control, encoder_hidden_states=text,
                         pooled_projections=pooled, timestep=kwargs["timestep"],
                         joint_attention_kwargs=kwargs.get("joint_attention_kwargs"), return_dict=False)[0]
    return {"block_controlnet_hidden_states": samples}


def _flux_residuals(controlnet, control, args: tuple, kwargs: dict, latent_shift: float) -> dict:
    """Flux: the ControlNet reads the packed control latents; outputs go to the double and single blocks."""
    from simpletuner.models.flux import pack_latents

    hidden = kwargs["hidden_states"]
    guidance = kwargs.get("guidance") if controlnet.config.guidance_embeds else None
    blocks, single_blocks = controlnet(
        hidden_states=hidden, controlnet_cond=pack_latents(control.to(hidden.dtype)),
        encoder_hidden_states=kwargs["encoder_hidden_states"], pooled_projections=kwargs["pooled_projections"],
        timestep=kwargs["timestep"], img_ids=kwargs["img_ids"], txt_ids=kwargs["txt_ids"], guidance=guidance,
        joint_attention_kwargs=kwargs.get("joint_attention_kwargs"), return_dict=False)
    return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": single_blocks}


def _sana_residuals(controlnet, control, args: tuple, kwargs: dict, latent_shift: float) -> dict:
    """Sana: the ControlNet reads the control latents; its block outputs are added after the transformer's blocks."""
    hidden = args[0] if args else kwargs["hidden_states"]
    samples = controlnet(hidden, encoder_hidden_states=kwargs["encoder_hidden_states"], timestep=kwargs["timestep"],
                         controlnet_cond=control.to(hidden.dtype),
                         encoder_attention_mask=kwargs.get("encoder_attention_mask"),
                         attention_kwargs=kwargs.get("attention_kwargs"), return_dict=False)[0]
    return {"controlnet_block_samples": tuple(samples)}


def _pixart_residuals(controlnet, control, args: tuple, kwargs: dict, latent_shift: float) -> dict:
    """PixArt: the transformer's forward takes no residuals; they are added by hooks (``BLOCK_RESIDUALS``)."""
    from simpletuner.models.pixart_controlnet import controlnet_residuals

    return {BLOCK_RESIDUALS: controlnet_residuals(controlnet, control, args, kwargs)}


RESIDUALS = {"unet": _unet_residuals, "sd3": _sd3_residuals, "flux": _flux_residuals, "sana": _sana_residuals,
             "pixart": _pixart_residuals}
BLOCK_RESIDUALS = "block_residuals"  # residuals added after the denoiser's blocks by forward hooks


class ControlledDenoiser(torch.nn.Module):
    """The frozen denoiser and its ControlNet, called like the denoiser plus ``control``."""

    def __init__(self, denoiser: torch.nn.Module, controlnet: torch.nn.Module, kind: ControlNetKind,
                 latent_shift: float = 0.0):
        super().__init__()
        self.denoiser = denoiser
        self.controlnet = controlnet
        self.kind = kind
        self.latent_shift = latent_shift  # VAE shift_factor * scaling_factor (SD3 InstantX-style ControlNets)

    @property
    def config(self):
        return self.denoiser.config

    def forward(self, *args, control: torch.Tensor | None = None, **kwargs):
        if control is None:
            raise ValueError("this run trains a ControlNet, so every batch needs a control input; this one came "
                             "without (only training datasets with conditioning_data provide it)")
        residuals = RESIDUALS[self.kind.denoiser_type](self.controlnet, control, args, kwargs, self.latent_shift)
        hooked = residuals.pop(BLOCK_RESIDUALS, None)
        if hooked is None:
            return self.denoiser(*args, **kwargs, **residuals)
        from simpletuner.models.pixart_controlnet import block_residuals_added

        with block_residuals_added(self.denoiser, hooked):
            return self.denoiser(*args, **kwargs)

    def enable_gradient_checkpointing(self, **kwargs) -> None:
        self.controlnet.enable_gradient_checkpointing(**kwargs)
        if getattr(self.denoiser, "_supports_gradient_checkpointing", False):
            self.denoiser.enable_gradient_checkpointing(**kwargs)


# --- building ---------------------------------------------------------------------------------------
def _reconfigured(controlnet, overrides: dict[str, Any]):
    """A ControlNet with the remaining config overrides, keeping every weight whose shape still fits."""
    unknown = sorted(set(overrides) - set(controlnet.config))
    if unknown:
        valid = ", ".join(sorted(key for key in controlnet.config if not key.startswith("_")))
        raise ConfigError("controlnet_custom_config", f"controlnet_custom_config has keys {unknown} that "
                                                      f"{type(controlnet).__name__} does not know; valid keys: "
                                                      f"{valid}.")
    reshaped = type(controlnet).from_config({**controlnet.config, **overrides})
    own = reshaped.state_dict()
    kept = {name: tensor for name, tensor in controlnet.state_dict().items()
            if name in own and own[name].shape == tensor.shape}
    reshaped.load_state_dict(kept, strict=False)
    return reshaped


def _pretrained_location(path: str) -> tuple[str, str | None]:
    """(path, subfolder): a folder holding a ``controlnet`` folder (a run's output) is read from that folder."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isfile(os.path.join(path, "controlnet", "config.json")):
            return path, "controlnet"
    return path, None


def build_controlnet(family, denoiser: torch.nn.Module, settings) -> torch.nn.Module:
    """Load controlnet_model_name_or_path, or build a ControlNet from the denoiser (with controlnet_custom_config)."""
    kind = controlnet_kind(family.name)
    overrides = custom_config(settings)
    path = settings.controlnet_model_name_or_path
    if path:
        if overrides:
            raise ConfigError("controlnet_custom_config", "controlnet_custom_config shapes a new ControlNet, but "
                                                          f"controlnet_model_name_or_path={path} loads a trained one; "
                                                          "remove one of the two.")
        location, subfolder = _pretrained_location(path)
        logger.info("Loading the ControlNet from %s", path)
        return kind.model().from_pretrained(location, subfolder=subfolder)
    logger.info("Creating a %s from the %s", kind.model().__name__, type(denoiser).__name__)
    controlnet = controlnet_from_denoiser(kind, denoiser, overrides)
    return _reconfigured(controlnet, overrides) if overrides else controlnet


def prepare_controlnet(family, components, settings, device) -> None:
    """Setup step (first, before quantization): build the ControlNet from the full-precision denoiser."""
    if not settings.controlnet:
        return
    controlnet = build_controlnet(family, components.denoiser, settings)
    components.extras[CONTROLNET_EXTRA] = controlnet.to(device)
