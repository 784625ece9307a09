"""Looking inside a PEFT-wrapped model in tests: its LoRA layers and whether they trained."""

from __future__ import annotations

import torch


def lora_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [layer for layer in module.modules() if isinstance(layer, LoraLayer)]


def lora_trained(module: torch.nn.Module) -> bool:
    """True when some LoRA up-projection left its zero initialisation: the adapter trained."""
    return any(layer.lora_B["default"].weight.abs().sum() > 0 for layer in lora_layers(module))
