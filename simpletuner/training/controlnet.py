"""ControlNet training: the denoiser stays frozen and a ControlNet beside it learns.

model_type=full trains every ControlNet weight. model_type=lora (PEFT,
lora_type=standard) puts LoRA adapters on the layers the ControlNet copied
from the denoiser and trains the ControlNet's own layers (control-image
embedder, zero-initialised output projections) in full: those start from
values no base model holds, so an adapter on them alone would leave the
result depending on a random initialisation nobody could reproduce.

Either way the result is a diffusers ControlNet folder, ``output_dir/controlnet``
(a LoRA merged into its weights), that the family's diffusers ControlNet
pipeline loads with ``<ControlNet class>.from_pretrained``. Checkpoints hold
every trainable tensor by name.
"""

from __future__ import annotations

import copy
import os
import re

import torch

from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.models.controlnets import UNET_CONTROLNET_LORA_TARGETS, ControlNetKind, controlnet_kind
from simpletuner.training import adapters
from simpletuner.training.accelerator import weight_dtype_for
from simpletuner.training.controlnet_model import CONTROLNET_EXTRA, ControlledDenoiser, build_controlnet
from simpletuner.training.trainable import TrainableModel

OUTPUT_FOLDER = "controlnet"


class ControlNetTrainable(TrainableModel):
    checkpoint_key = "controlnet"

    def __init__(self, family, settings: Settings):
        super().__init__(family, settings)
        self.kind = controlnet_kind(family.name)
        if settings.model_type == "lora" and settings.lora_type != "standard":
            raise ConfigError("lora_type", f"controlnet=true with lora_type={settings.lora_type} is not implemented; "
                                           "use lora_type=standard or model_type=full.")

    def attach(self) -> None:
        components = self.family.components
        denoiser = components.denoiser
        denoiser.requires_grad_(False)
        controlnet = components.extras.pop(CONTROLNET_EXTRA, None)
        if controlnet is None:  # no setup step built it (e.g. components prepared elsewhere)
            controlnet = build_controlnet(self.family, denoiser, self.settings)
        if self.settings.model_type == "lora":  # frozen copied layers in the frozen-weight dtype, like the denoiser
            controlnet.to(device=_device_of(denoiser), dtype=weight_dtype_for(self.settings))
            _attach_lora(controlnet, self.kind, self.family, self.settings)
        else:
            controlnet.to(_device_of(denoiser))
            controlnet.requires_grad_(True)
        controlnet.train()
        self.module = ControlledDenoiser(denoiser, controlnet, self.kind, _latent_shift(components.vae))
        components.denoiser = self.module
        self._collect_parameters()

    # --- checkpoints: every trainable tensor, by name ---
    def state_dict(self, module):
        return {name: parameter for name, parameter in module.controlnet.named_parameters() if parameter.requires_grad}

    def load_state_dict(self, module, state):
        wanted = set(self.state_dict(module))
        if set(state) != wanted:
            missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
            raise ValueError(f"The checkpoint's ControlNet weights do not fit this run: {len(missing)} missing "
                             f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). Was it "
                             "saved with other model_type, LoRA targets or controlnet_custom_config?")
        module.controlnet.load_state_dict(state, strict=False)

    # --- the finished ControlNet ---
    def save(self, module, folder):
        controlnet = module.controlnet
        plain = _merged(controlnet) if self.settings.model_type == "lora" else controlnet
        plain.save_pretrained(os.path.join(folder, OUTPUT_FOLDER), safe_serialization=True)


def _device_of(module: torch.nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _latent_shift(vae) -> float:
    config = getattr(vae, "config", None)
    shift = getattr(config, "shift_factor", None) or 0.0
    return float(shift) * float(getattr(config, "scaling_factor", 1.0) or 1.0)


# --- LoRA on a ControlNet ---------------------------------------------------------------------------
def lora_trunk_targets(kind: ControlNetKind, family, settings: Settings) -> list[str]:
    """Module-name suffixes the LoRA wraps before peft_lora_target_modules applies (the copied denoiser part)."""
    if kind.denoiser_type == "unet":
        return list(UNET_CONTROLNET_LORA_TARGETS)
    if kind.denoiser_type == "flux":
        from simpletuner.models.flux_lora_targets import flux_controlnet_lora_targets

        return flux_controlnet_lora_targets(settings.flux_lora_target)
    return family.lora_target_modules()


def _is_own(name: str, kind: ControlNetKind) -> bool:
    return any(name == own or name.startswith(own + ".") for own in kind.own_modules)


def _expand_targets(controlnet: torch.nn.Module, suffixes: list[str], kind: ControlNetKind) -> list[str]:
    """Full names of the Linear/Conv2d layers matching ``suffixes``, outside the ControlNet's own layers."""
    names = []
    for name, child in controlnet.named_modules():
        if not isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)) or _is_own(name, kind):
            continue
        if any(name == suffix or name.endswith("." + suffix) for suffix in suffixes):
            names.append(name)
    return names


def _attach_lora(controlnet: torch.nn.Module, kind: ControlNetKind, family, settings: Settings) -> None:
    controlnet.requires_grad_(False)
    suffixes = adapters.resolve_target_modules(settings, lora_trunk_targets(kind, family, settings))
    names = _expand_targets(controlnet, suffixes, kind)
    if suffixes and not names:
        raise ConfigError("peft_lora_target_modules", f"no layer of the {type(controlnet).__name__} outside its own "
                                                      f"control layers matches the LoRA targets {suffixes}; fix "
                                                      "peft_lora_target_modules.")
    if names:
        config = adapters.lora_config(settings.replace(peft_lora_target_modules=None), names)
        # Whole names only: PEFT's list matching would also catch control layers whose path ends with a name.
        config.target_modules = "|".join(re.escape(name) for name in names)
        controlnet.add_adapter(config)
    for name, child in controlnet.named_children():
        if _is_own(name, kind):
            child.requires_grad_(True)


def _merged(controlnet: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of a LoRA-carrying ControlNet with the adapters merged into its weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(controlnet)
    for module in merged.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
    state = {}
    for name, tensor in merged.state_dict().items():
        if "lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    plain = type(controlnet).from_config(controlnet.config)  # float32, whatever the adapted copy's dtypes
    plain.load_state_dict(state, strict=True)
    return plain
