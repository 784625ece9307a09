"""Changes applied to loaded model components before training: the place for attention
backends, quantization of frozen weights and offloading (each in its own module).

Steps run in order; each takes (family, components, settings, device) and changes the
components in place. A step whose option is at its default does nothing.
"""

from __future__ import annotations

from typing import Callable

from simpletuner.config.settings import Settings
from simpletuner.training.attention import configure_attention
from simpletuner.training.channel_control import prepare_channel_control
from simpletuner.training.checkpointing import check_checkpointing
from simpletuner.training.controlnet_model import prepare_controlnet
from simpletuner.training.offload import apply_offloading
from simpletuner.training.quantization import quantize_components
from simpletuner.training.vae_memory import configure_vae

# A ControlNet is copied from (and channel control widens) the full-precision denoiser before quantising;
# quantise before offloading stores the weights.
SETUP_STEPS: list[Callable] = [prepare_controlnet, prepare_channel_control, quantize_components, configure_attention,
                               configure_vae, check_checkpointing, apply_offloading]


def prepare_components(family, components, settings: Settings, device) -> None:
    for step in SETUP_STEPS:
        step(family, components, settings, device)
