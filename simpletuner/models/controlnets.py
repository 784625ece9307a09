"""Which families can train a ControlNet, and the diffusers classes each one uses.

A ControlNet is a trainable copy of (part of) the denoiser that reads a
control image and adds its outputs to the frozen denoiser's hidden states.
The facts here are shared by the data pipeline (does the control image go in
as pixels or as VAE latents?), the trainer (which class to build and how to
call it) and validation (which pipeline renders with it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from simpletuner.config.errors import ConfigError

PIXELS = "pixels"  # the control image itself, fed in [0, 1] (SD 1.x/2.x/XL ControlNetModel)
LATENTS = "latents"  # the control image's VAE latents (transformer ControlNets: SD3, Flux, Sana, PixArt)


def resolve_class(name: str) -> type:
    """A class named in a ControlNetKind: a diffusers class name, or "module.path:Class" for one of ours."""
    import importlib

    if ":" in name:
        module, _, attribute = name.partition(":")
        return getattr(importlib.import_module(module), attribute)
    import diffusers

    return getattr(diffusers, name)


@dataclass(frozen=True)
class ControlNetKind:
    model_class: str  # ControlNet class (see resolve_class)
    pipeline_class: str  # pipeline that renders with that ControlNet (see resolve_class)
    control_input: str  # PIXELS or LATENTS
    # "unet", "sd3", "flux", "sana" or "pixart": how the ControlNet's outputs reach the denoiser
    denoiser_type: str
    image_argument: str  # the pipeline call's keyword for the control image
    # The ControlNet's own layers (control-image embedder, zero-initialised output projections): they have no
    # counterpart in the denoiser, so a LoRA run trains them in full.
    own_modules: tuple[str, ...]

    def model(self) -> type:
        return resolve_class(self.model_class)

    def pipeline(self) -> type:
        return resolve_class(self.pipeline_class)


# Layers of a UNet ControlNet that a LoRA wraps by default: the copied UNet encoder's attention, feed-forward,
# resnet convolutions and time embedding.
UNET_CONTROLNET_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv", "conv1",
    "conv2", "conv_in", "conv_shortcut", "linear_1", "linear_2", "time_emb_proj",
)
_UNET_OWN = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")
_UNET_PIPELINE = "StableDiffusionControlNetPipeline"
CONTROLNET_KINDS: dict[str, ControlNetKind] = {
    "sd1x": ControlNetKind("ControlNetModel", _UNET_PIPELINE, PIXELS, "unet", "image", _UNET_OWN),
    "sd2x": ControlNetKind("ControlNetModel", _UNET_PIPELINE, PIXELS, "unet", "image", _UNET_OWN),
    "sdxl": ControlNetKind("ControlNetModel", "StableDiffusionXLControlNetPipeline", PIXELS, "unet", "image",
                           _UNET_OWN),
    "sd3": ControlNetKind("SD3ControlNetModel", "StableDiffusion3ControlNetPipeline", LATENTS, "sd3",
                          "control_image", ("pos_embed_input", "controlnet_blocks")),
    "flux": ControlNetKind("FluxControlNetModel", "FluxControlNetPipeline", LATENTS, "flux", "control_image",
                           ("controlnet_x_embedder", "controlnet_blocks", "controlnet_single_blocks")),
    "sana": ControlNetKind("SanaControlNetModel", "SanaControlNetPipeline", LATENTS, "sana", "control_image",
                           ("input_block", "controlnet_blocks")),
    # diffusers has no PixArt ControlNet: these are ours (models/pixart_controlnet*.py).
    "pixart_sigma": ControlNetKind("simpletuner.models.pixart_controlnet:PixArtControlNetModel",
                                   "simpletuner.models.pixart_controlnet_pipeline:PixArtSigmaControlNetPipeline",
                                   LATENTS, "pixart", "control_image",
                                   ("controlnet_cond_embedding", "controlnet_blocks")),
}

# Families this trainer knows but cannot train a ControlNet for, and why.
UNSUPPORTED = {
    "auraflow": "diffusers has no AuraFlow ControlNet model or pipeline to build and load it with",
    "lumina2": "diffusers has no Lumina 2 ControlNet model or pipeline to build and load it with",
    "hidream": "diffusers has no HiDream ControlNet model or pipeline to build and load it with",
    "kolors": "diffusers has no Kolors ControlNet pipeline to render and load it with",
    "deepfloyd": "diffusers has no DeepFloyd IF ControlNet model or pipeline to build and load it with",
    "qwen_image": "Qwen-Image ControlNet training (diffusers' QwenImageControlNetModel) is not implemented yet",
}


def controlnet_kind(family_name: str | None) -> ControlNetKind:
    """The ControlNet facts of a family; a ConfigError naming the supported families otherwise."""
    kind = CONTROLNET_KINDS.get(family_name or "")
    if kind is not None:
        return kind
    reason = UNSUPPORTED.get(family_name or "", "this trainer has no ControlNet for that family")
    raise ConfigError("controlnet", f"controlnet=true is not available for model_family={family_name}: {reason}. "
                                    f"ControlNet training works with: {', '.join(CONTROLNET_KINDS)}.")


def control_input_for(settings) -> str | None:
    """PIXELS or LATENTS when the run trains a ControlNet, LATENTS for channel control (control); else None."""
    if getattr(settings, "control", False):
        return LATENTS
    if not getattr(settings, "controlnet", False):
        return None
    return controlnet_kind(getattr(settings, "model_family", None)).control_input


def custom_config(settings) -> dict[str, Any]:
    """controlnet_custom_config as a dict: a JSON object, a path to a JSON file, or already a mapping."""
    value = settings.controlnet_custom_config
    if value in (None, "", {}):
        return {}
    if isinstance(value, dict):
        return dict(value)
    text = str(value).strip()
    source = "controlnet_custom_config"
    if not text.startswith("{") and os.path.isfile(text):
        source = f"controlnet_custom_config file {text}"
        with open(text, encoding="utf-8") as handle:
            text = handle.read()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError("controlnet_custom_config", f"{source} is not valid JSON ({error}); write an object such "
                                                      'as {"num_layers": 2}, or the path of a file holding one.')
    if not isinstance(parsed, dict):
        raise ConfigError("controlnet_custom_config", f"{source} must be a JSON object of ControlNet config "
                                                      f"values, not {type(parsed).__name__}.")
    return parsed


def controlnet_problems(settings) -> list[ConfigError]:
    """ControlNet and mask settings a run cannot honour, found before any model loads."""
    problems: list[ConfigError] = []
    probability = settings.masked_loss_probability
    if probability is not None and not 0.0 <= float(probability) <= 1.0:
        problems.append(ConfigError("masked_loss_probability", f"masked_loss_probability={probability} must be "
                                                               "between 0 and 1 (the chance a batch uses its masks)."))
    if not settings.controlnet:
        for name in ("controlnet_model_name_or_path", "controlnet_custom_config"):
            if getattr(settings, name) not in (None, "", {}):
                problems.append(ConfigError(name, f"{name} only applies to ControlNet training; set "
                                                  "controlnet=true or remove it."))
        if settings.model_family == "flux" and "controlnet" in str(settings.flux_lora_target or ""):
            problems.append(ConfigError("flux_lora_target", f"flux_lora_target={settings.flux_lora_target} targets "
                                                            "ControlNet layers; set controlnet=true or choose "
                                                            "another preset."))
        return problems
    try:
        controlnet_kind(settings.model_family)
        custom_config(settings)
    except ConfigError as error:
        problems.append(error)
    if settings.model_type == "lora" and settings.lora_type != "standard":
        problems.append(ConfigError("lora_type", f"controlnet=true with lora_type={settings.lora_type} is not "
                                                 "implemented; use lora_type=standard or model_type=full."))
    for name, what in _NOT_WITH_CONTROLNET.items():
        if getattr(settings, name, None) not in (None, False, "", "none"):
            problems.append(ConfigError(name, f"{name} {what}, which a ControlNet run does not do yet; remove it "
                                              "or set controlnet=false."))
    if _renders_validation_images(settings):
        for name, what in _NOT_WITH_CONTROLNET_VALIDATION.items():
            if getattr(settings, name, None):
                problems.append(ConfigError(name, f"{name} {what}, which is not implemented for ControlNet "
                                                  "validation renders; remove it or set validation_disable=true."))
    return problems


# Options that change how the denoiser or text encoders train: a ControlNet run trains neither.
_NOT_WITH_CONTROLNET = {
    "init_lora": "seeds a LoRA on the denoiser",
    "train_text_encoder": "trains the text encoders",
    "layer_freeze_strategy": "chooses which denoiser layers train",
}
# Validation options a ControlNet run's renders (text-to-image with a control image) cannot honour yet.
_NOT_WITH_CONTROLNET_VALIDATION = {
    "validation_using_datasets": "renders image-to-image from dataset images",
    "validation_torch_compile": "compiles the denoiser for validation renders",
}
_PROMPT_SOURCES = ("validation_prompt", "user_prompt_library", "validation_prompt_library", "validation_using_datasets")


def _renders_validation_images(settings) -> bool:
    if settings.validation_disable or settings.validation_method != "simpletuner-local":
        return False
    return any(getattr(settings, name, None) for name in _PROMPT_SOURCES)
