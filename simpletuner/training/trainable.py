"""What a run trains: a PEFT LoRA on the denoiser, or the whole denoiser.

The trainer only talks to a ``TrainableModel``: the module accelerate wraps,
its trainable parameters (found once), the weights a checkpoint holds, and how
the finished result is written. New adapter kinds (LyCORIS, ControlNet, ...)
are new subclasses registered in ``make_trainable``; the trainer is unchanged.
"""

from __future__ import annotations

import os

import torch

from simpletuner.config.settings import Settings
from simpletuner.training import adapters


class TrainableModel:
    checkpoint_key = "model"  # file stem of the weights inside a checkpoint

    def __init__(self, family, settings: Settings):
        self.family = family
        self.settings = settings
        self.module: torch.nn.Module = family.components.denoiser  # what accelerate prepares
        self.parameters: list[torch.nn.Parameter] = []

    def attach(self) -> None:
        """Set requires_grad (and add adapter layers); fills self.parameters."""
        raise NotImplementedError

    def state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state_dict(self, module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def save(self, module: torch.nn.Module, folder: str) -> None:
        """Write the finished result into folder (unwrapped module)."""
        raise NotImplementedError

    def param_groups(self, learning_rate: float) -> list[dict]:
        """Optimizer parameter groups; parts with their own learning rate (text encoders) add groups."""
        return [{"params": self.parameters, "lr": learning_rate}]

    def prepare_batch(self, batch):
        """The batch the loss step sees (text encoders in training re-encode its captions)."""
        return batch

    def _collect_parameters(self) -> None:
        self.parameters = adapters.trainable_parameters(self.module)
        for parameter in self.parameters:
            # Trained weights stay float32 under mixed precision, so their gradients accumulate in float32
            # whatever gradient_precision says.
            parameter.data = parameter.data.float()


class PeftLora(TrainableModel):
    checkpoint_key = "adapter"

    def attach(self) -> None:
        self.module.requires_grad_(False)
        adapters.attach_lora(self.module, self.settings, self.family.lora_target_modules())
        if self.settings.init_lora:
            from simpletuner.training.init_lora import load_initial_lora

            load_initial_lora(self.module, self.settings, self.family.denoiser_subfolder)
        self._collect_parameters()

    def state_dict(self, module):
        return adapters.lora_state_dict(module)

    def load_state_dict(self, module, state):
        adapters.load_lora_state(module, state)

    def save(self, module, folder):
        os.makedirs(folder, exist_ok=True)
        if self.settings.lora_format == "comfyui":
            from simpletuner.training import comfyui_format

            config = module.peft_config["default"]
            comfyui_format.save_comfyui_lora(os.path.join(folder, comfyui_format.LORA_FILE),
                                             adapters.lora_state_dict(module), config.lora_alpha, config.to_dict())
            return
        metadata = {self.family.denoiser_subfolder: module.peft_config["default"].to_dict()}
        self.family.save_lora(folder, adapters.lora_state_dict(module), adapter_metadata=metadata)


class FullModel(TrainableModel):
    def attach(self) -> None:
        self.module.requires_grad_(True)
        if self.settings.layer_freeze_strategy == "bitfit":
            freeze_all_but_biases(self.module)
        self._collect_parameters()

    def state_dict(self, module):
        return module.state_dict()

    def load_state_dict(self, module, state):
        module.load_state_dict(state)

    def save(self, module, folder):
        os.makedirs(folder, exist_ok=True)
        self.family.build_pipeline(denoiser=module).save_pretrained(folder, safe_serialization=True)


def freeze_all_but_biases(module: torch.nn.Module) -> None:
    """BitFit (layer_freeze_strategy=bitfit): only the bias terms keep training."""
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(name.rsplit(".", 1)[-1] == "bias")


def make_trainable(family, settings: Settings) -> TrainableModel:
    if settings.controlnet:
        from simpletuner.training.controlnet import ControlNetTrainable

        return ControlNetTrainable(family, settings)
    trained = _denoiser_trainable(family, settings)
    if settings.train_text_encoder:
        from simpletuner.training.text_encoder_training import WithTextEncoders

        return WithTextEncoders(trained)
    return trained


def _denoiser_trainable(family, settings: Settings) -> TrainableModel:
    if settings.model_type == "full" and settings.control:
        from simpletuner.training.channel_control import ChannelControlFull

        return ChannelControlFull(family, settings)  # a control LoRA is a PeftLora: only its targets differ
    if settings.model_type == "full":
        return FullModel(family, settings)
    if settings.lora_type == "lycoris":
        from simpletuner.training.lycoris_adapter import LycorisNetwork

        return LycorisNetwork(family, settings)
    return PeftLora(family, settings)
