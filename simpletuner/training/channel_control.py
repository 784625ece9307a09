"""Channel-wise control training (control=true): the control image joins the denoiser's input.

Instead of a ControlNet beside the model, the denoiser's first layer is made
twice as wide. Its input becomes the noisy latents followed by the control
image's VAE latents, taken from the conditioning dataset linked to each
training dataset (``TrainingBatch.conditioning_latents``). The new half of
the layer starts at zero, so the first step computes exactly what the base
model computes, and training teaches it to read the control latents.

- Flux (like FLUX.1 Canny/Depth dev): ``x_embedder`` reads 2 x 64 packed
  channels; the packed control latents follow the packed noisy latents in
  every token. The result renders with diffusers' ``FluxControlPipeline``.
  A LoRA run wraps ``x_embedder`` too; diffusers' Flux LoRA loader widens a
  plain transformer's ``x_embedder`` (new half zero) when it meets such a
  LoRA, which reproduces the trained layer exactly.
- SD 1.x/2.x/XL (the InstructPix2Pix layout): ``conv_in`` reads 8 channels,
  the noisy latents then the control image's unscaled VAE latents; the
  result renders with ``StableDiffusion(XL)InstructPix2PixPipeline``. Only
  model_type=full: diffusers' UNet LoRA loaders cannot widen ``conv_in``.

A base model whose input layer is already wide (FLUX.1 Canny dev, an
InstructPix2Pix UNet, a previous run's output) is trained as it is.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from simpletuner.models.pipeline_rebuild import rebuilt_pipeline
from simpletuner.config.errors import ConfigError
from simpletuner.training.trainable import FullModel

logger = logging.getLogger("simpletuner.control")


@dataclass(frozen=True)
class ChannelControlKind:
    input_layer: str  # the denoiser's first layer, widened: "x_embedder" (Linear) or "conv_in" (Conv2d)
    pipeline_class: str  # the diffusers pipeline that renders with the widened denoiser
    image_argument: str  # that pipeline's keyword for the control image
    patch_size: int  # latent pixels per token side: Flux packs 2x2 patches, a UNet reads every pixel
    raw_latents: bool  # True: the pipeline feeds the VAE's unscaled latents (InstructPix2Pix)
    lora: bool  # whether diffusers can load a LoRA onto the widened layer into a plain base model


_FLUX = ChannelControlKind("x_embedder", "FluxControlPipeline", "control_image", 2, False, True)
_SD_PIX2PIX = ChannelControlKind("conv_in", "StableDiffusionInstructPix2PixPipeline", "image", 1, True, False)
CHANNEL_CONTROL_KINDS: dict[str, ChannelControlKind] = {
    "flux": _FLUX,
    "sd1x": _SD_PIX2PIX,
    "sd2x": _SD_PIX2PIX,
    "sdxl": ChannelControlKind("conv_in", "StableDiffusionXLInstructPix2PixPipeline", "image", 1, True, False),
}


def channel_control_kind(family_name: str | None) -> ChannelControlKind:
    kind = CHANNEL_CONTROL_KINDS.get(family_name or "")
    if kind is None:
        raise ConfigError("control", f"control=true is not available for model_family={family_name}: diffusers has "
                                     "no pipeline that renders it with a widened input layer. Channel control "
                                     f"works with: {', '.join(CHANNEL_CONTROL_KINDS)}.")
    return kind


# --- checks before any model loads ------------------------------------------------------------------
def channel_control_problems(settings) -> list[ConfigError]:
    """control=true settings a run cannot honour (control with controlnet is refused in config/validate.py)."""
    if not settings.control:
        return []
    try:
        kind = channel_control_kind(settings.model_family)
    except ConfigError as error:
        return [error]
    problems = []
    if settings.model_type == "lora":
        problems.extend(_lora_problems(settings, kind))
    if settings.validation_using_datasets and not settings.validation_disable:
        problems.append(ConfigError("validation_using_datasets", "validation_using_datasets renders image-to-image "
                                                                 "from dataset images, which is not implemented for "
                                                                 "control=true runs; turn it off (validation renders "
                                                                 "from a training image's control image)."))
    return problems


def _lora_problems(settings, kind: ChannelControlKind) -> list[ConfigError]:
    family = settings.model_family
    if not kind.lora:
        supported = ", ".join(name for name, other in CHANNEL_CONTROL_KINDS.items() if other.lora)
        return [ConfigError("model_type", f"control=true with model_type=lora is not available for "
                                          f"model_family={family}: diffusers' LoRA loader cannot widen its "
                                          f"{kind.input_layer} to fit the adapter. Use model_type=full (saves an "
                                          f"{kind.pipeline_class} folder), or a family with control LoRAs: "
                                          f"{supported}.")]
    if settings.lora_type != "standard":
        return [ConfigError("lora_type", f"control=true with lora_type={settings.lora_type} is not implemented: "
                                         f"only a PEFT LoRA (lora_type=standard) loads into {kind.pipeline_class}. "
                                         "Use lora_type=standard or model_type=full.")]
    if settings.lora_format == "comfyui":
        return [ConfigError("lora_format", f"control=true with lora_format=comfyui is not implemented: the widened "
                                           f"{kind.input_layer} is only known to load through diffusers' "
                                           f"{kind.pipeline_class}. Use lora_format=diffusers.")]
    from simpletuner.training.adapters import resolve_target_modules

    targets = resolve_target_modules(settings, []) if settings.peft_lora_target_modules else []
    layer = kind.input_layer
    if targets and not any(name == layer or name.endswith("." + layer) for name in targets):
        return [ConfigError("peft_lora_target_modules", f"control=true with model_type=lora reads the control "
                                                        f"latents through {layer}, but peft_lora_target_modules "
                                                        f"{targets} leaves it out; add \"{layer}\" to the list.")]
    return []


# --- widening the input layer -----------------------------------------------------------------------
def _widened(layer: torch.nn.Module, in_features: int) -> torch.nn.Module:
    """A copy of ``layer`` reading ``in_features`` inputs: the old weights first, zeros for the new inputs."""
    if type(layer) not in (torch.nn.Linear, torch.nn.Conv2d):  # e.g. a layer quantised while loading (GGUF)
        raise ConfigError("control", f"control=true widens the denoiser's input layer, which must be a plain "
                                     f"Linear or Conv2d, but this one is a {type(layer).__name__} (a quantised "
                                     "checkpoint or quantize_via=pipeline?). Load full-precision weights; "
                                     "base_model_precision quantises after the layer is widened.")
    options = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    if isinstance(layer, torch.nn.Linear):
        wide = torch.nn.Linear(in_features, layer.out_features, bias=layer.bias is not None, **options)
    else:
        wide = torch.nn.Conv2d(in_features, layer.out_channels, layer.kernel_size, stride=layer.stride,
                               padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                               bias=layer.bias is not None, padding_mode=layer.padding_mode, **options)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, :_inputs(layer)].copy_(layer.weight)
        if layer.bias is not None:
            wide.bias.copy_(layer.bias)
    return wide


def _inputs(layer: torch.nn.Module) -> int:
    return layer.in_features if isinstance(layer, torch.nn.Linear) else layer.in_channels


def widen_input_layer(denoiser: torch.nn.Module, kind: ChannelControlKind, latent_channels: int) -> bool:
    """Make ``denoiser``'s input layer read noisy + control latents; False when it already does.

    ``latent_channels`` is the VAE's; the config's in_channels follows the new width and
    out_channels keeps the old one (Flux would otherwise derive it from in_channels).
    """
    layer = getattr(denoiser, kind.input_layer)
    single = latent_channels * kind.patch_size ** 2
    width = _inputs(layer)
    if width == 2 * single:
        logger.info("%s already reads %d channels (noisy + control latents); it is trained as it is",
                    kind.input_layer, width)
        return False
    if width != single:
        raise ConfigError("control", f"control=true doubles {kind.input_layer}'s input from {single} channels "
                                     f"({latent_channels} latent channels), but this model's reads {width}; it is "
                                     "neither a plain nor a control model of this family.")
    setattr(denoiser, kind.input_layer, _widened(layer, 2 * single))
    out_channels = getattr(denoiser.config, "out_channels", None) or denoiser.config.in_channels
    denoiser.register_to_config(in_channels=denoiser.config.in_channels * 2, out_channels=out_channels)
    logger.info("Widened %s from %d to %d input channels for channel control (new half zero)",
                kind.input_layer, single, 2 * single)
    return True


def prepare_channel_control(family, components, settings, device) -> None:
    """Setup step (before quantization): widen the denoiser's input layer for control=true."""
    if not settings.control:
        return
    kind = channel_control_kind(family.name)
    widen_input_layer(components.denoiser, kind, int(components.vae.config.latent_channels))


# --- the widened input, per batch -------------------------------------------------------------------
def _control_latents(batch, like: torch.Tensor) -> torch.Tensor:
    control = batch.conditioning_latents
    if control is None:
        raise ValueError("this run trains with control=true, so every batch needs control latents; this one came "
                         "without (only training datasets with conditioning_data provide them)")
    return control.to(device=like.device, dtype=like.dtype)


def with_control_tokens(tokens: torch.Tensor, batch) -> torch.Tensor:
    """Flux: packed noisy latents (B, N, C*4) followed, in every token, by the packed control latents."""
    from simpletuner.models.flux import pack_latents

    return torch.cat([tokens, pack_latents(_control_latents(batch, tokens))], dim=2)


def with_control_channels(sample: torch.Tensor, batch, vae_config) -> torch.Tensor:
    """UNet (InstructPix2Pix): noisy latents (B, 4, H, W) followed by the control image's unscaled latents.

    The cache holds ``(mean - shift) * scaling_factor``; the pipelines feed the VAE's mode
    (its mean) as it is, so the scaling is undone here.
    """
    control = _control_latents(batch, sample)
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return torch.cat([sample, control / vae_config.scaling_factor + shift], dim=1)


# --- pipelines and outputs --------------------------------------------------------------------------
def control_pipeline_class(family_name: str):
    import diffusers

    return getattr(diffusers, channel_control_kind(family_name).pipeline_class)


def control_pipeline(family, denoiser: torch.nn.Module | None = None):
    """The family's channel-control pipeline (FluxControlPipeline, InstructPix2Pix) over its loaded parts."""
    return rebuilt_pipeline(family.build_pipeline(denoiser=denoiser), control_pipeline_class(family.name))


class ChannelControlFull(FullModel):
    """model_type=full with control=true: the widened denoiser saved in its control pipeline's folder."""

    def save(self, module, folder):
        os.makedirs(folder, exist_ok=True)
        control_pipeline(self.family, module).save_pretrained(folder, safe_serialization=True)
