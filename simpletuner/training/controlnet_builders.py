"""New ControlNets initialised from the denoiser, one builder per denoiser type.

Each builder copies what the ControlNet shares with the denoiser (embeddings
and the first blocks) and leaves the ControlNet's own layers zero-initialised.
Layer-count (and, for SD, input-channel) keys of controlnet_custom_config are consumed
from ``overrides`` here; the rest reshape the result afterwards
(``controlnet_model._reconfigured``).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from simpletuner.config.errors import ConfigError
from simpletuner.models.controlnets import ControlNetKind

SANA_COPIED_EMBEDDINGS = ("patch_embed.", "time_embed.", "caption_projection.", "caption_norm.")
# Sana transformer settings SanaControlNetModel and SanaControlNetPipeline do not reproduce, with the value
# they assume: later Sana versions (1.5, Sprint) change these, and a ControlNet built from them would not match.
SANA_PLAIN_CONFIG = {"guidance_embeds": False, "qk_norm": None, "timestep_scale": 1.0}


def _layer_count(overrides: dict, default: int, lowest: int, highest: int, what: str) -> int:
    layers = int(overrides.pop("num_layers", default))
    if not lowest <= layers <= highest:
        raise ConfigError("controlnet_custom_config", f"num_layers={layers}: {what} copies between {lowest} and "
                                                      f"{highest} of the transformer's blocks.")
    return layers


def _unet(model_class, denoiser, overrides: dict[str, Any]):
    accepted = ("conditioning_channels", "conditioning_embedding_out_channels", "controlnet_conditioning_channel_order")
    return model_class.from_unet(denoiser, **{key: overrides.pop(key) for key in accepted if key in overrides})


def _sd3(model_class, denoiser, overrides: dict[str, Any]):
    config = denoiser.config
    # The transformer's last block reads no text output (context_pre_only), so a ControlNet copies fewer.
    layers = _layer_count(overrides, max(1, min(12, config.num_layers - 1)), 1, config.num_layers - 1,
                          "an SD3 ControlNet")
    extra = overrides.pop("extra_conditioning_channels", 0)
    controlnet = model_class.from_transformer(denoiser, num_layers=layers, num_extra_conditioning_channels=extra)
    controlnet.register_to_config(force_zeros_for_pooled_projection=False)  # the pipeline then passes pooled text
    return controlnet


def _flux(model_class, denoiser, overrides: dict[str, Any]):
    config = denoiser.config
    arguments = {"num_layers": min(4, config.num_layers), "num_single_layers": min(10, config.num_single_layers),
                 "attention_head_dim": config.attention_head_dim, "num_attention_heads": config.num_attention_heads}
    arguments.update({key: overrides.pop(key) for key in list(arguments) if key in overrides})
    return model_class.from_transformer(denoiser, **arguments)


def _sana(model_class, denoiser, overrides: dict[str, Any]):
    """A SanaControlNetModel with the transformer's embeddings and first blocks.

    SanaTransformer2DModel adds the ControlNet's residual ``k`` after its block
    ``k + 1``, so at most one block fewer than the transformer has is copied.
    """
    config = denoiser.config
    for key, plain in SANA_PLAIN_CONFIG.items():
        if config.get(key, plain) != plain:
            raise ConfigError("controlnet", f"controlnet=true cannot train a ControlNet for this Sana transformer "
                                            f"({key}={config.get(key)!r}): diffusers' SanaControlNetModel and "
                                            "SanaControlNetPipeline only reproduce Sana 1.0 transformers "
                                            f"({key}={plain!r}). Use a Sana 1.0 base model.")
    layers = _layer_count(overrides, max(1, min(7, config.num_layers - 1)), 1, config.num_layers - 1,
                          "a Sana ControlNet")
    accepted = set(inspect.signature(model_class.__init__).parameters) - {"self", "num_layers"}
    controlnet = model_class(**{key: value for key, value in config.items() if key in accepted}, num_layers=layers)
    return copy_denoiser_layers(controlnet, denoiser, SANA_COPIED_EMBEDDINGS, layers,
                                ("input_block.", "controlnet_blocks."))


def _pixart(model_class, denoiser, overrides: dict[str, Any]):
    from simpletuner.models.pixart_controlnet import default_layer_count

    total = denoiser.config.num_layers
    layers = _layer_count(overrides, default_layer_count(total), 1, total, "a PixArt ControlNet")
    return model_class.from_transformer(denoiser, num_layers=layers)


def copy_denoiser_layers(controlnet: torch.nn.Module, denoiser: torch.nn.Module, embeddings: tuple[str, ...],
                         layers: int, own: tuple[str, ...]) -> torch.nn.Module:
    """Load ``denoiser``'s embeddings and first ``layers`` transformer blocks into ``controlnet``.

    Only the ControlNet's own layers (``own`` prefixes) may be left out.
    """
    def copied(name: str) -> bool:
        parts = name.split(".")
        return name.startswith(embeddings) or (parts[0] == "transformer_blocks" and int(parts[1]) < layers)

    state = {name: tensor for name, tensor in denoiser.state_dict().items() if copied(name)}
    missing, unexpected = controlnet.load_state_dict(state, strict=False)
    not_own = [name for name in missing if not name.startswith(own)]
    if not_own or unexpected:
        raise ValueError(f"the {type(denoiser).__name__} layers do not fit the {type(controlnet).__name__}: "
                         f"missing {not_own[:3]}, unexpected {unexpected[:3]}")
    return controlnet


BUILDERS: dict[str, Callable] = {"unet": _unet, "sd3": _sd3, "flux": _flux, "sana": _sana, "pixart": _pixart}


def controlnet_from_denoiser(kind: ControlNetKind, denoiser: torch.nn.Module, overrides: dict[str, Any]):
    """A new ControlNet of ``kind`` initialised from ``denoiser``; consumed keys are removed from ``overrides``."""
    return BUILDERS[kind.denoiser_type](kind.model(), denoiser, overrides)
