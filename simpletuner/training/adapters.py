"""PEFT LoRA (and DoRA) adapters: configure, attach, save and restore.

Diffusers models attach through their own ``add_adapter``; any other module
(e.g. a transformers text encoder) through ``peft.inject_adapter_in_model``.
Both leave only the adapter weights trainable. State dicts use PEFT's key
names without the adapter name, the layout diffusers' LoRA loaders read.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import torch

from simpletuner.config.errors import ConfigError

# lora_init_type -> LoraConfig.init_lora_weights
_INIT_WEIGHTS: dict[str, Any] = {
    "default": True,  # Kaiming-uniform A, zero B: the adapter starts as a no-op
    "gaussian": "gaussian",  # normal A scaled by rank, zero B
    "loftq": "loftq",  # fits A, B so that 4-bit quantized base + adapter approximates the base
    "olora": "olora",  # A, B from a QR decomposition of the base weight (base is adjusted to match)
    "pissa": "pissa",  # A, B from the base weight's top singular vectors (base is adjusted to match)
}
_LOFTQ_BITS = 4
_LOFTQ_ITERATIONS = 1
_ADAPTER_NAME = "default"
_NAMES_SHOWN = 30  # layer names listed when no target matched


def resolve_target_modules(settings, default_targets: list[str]) -> list[str]:
    """``peft_lora_target_modules`` when set (list, JSON list, path to a JSON file, or comma list), else the default."""
    value = settings.peft_lora_target_modules
    if value is None or (isinstance(value, str) and not value.strip()):
        return list(default_targets)
    targets = _parse_target_list(value)
    if not targets or not all(isinstance(name, str) and name for name in targets):
        raise ConfigError("peft_lora_target_modules",
                          f"peft_lora_target_modules={value!r} must list one or more module names, e.g. "
                          '["to_q", "to_k", "to_v", "to_out.0"].')
    return targets


def _parse_target_list(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    text = str(value).strip()
    if text.startswith(("[", "{")):
        return _json_list(text, "peft_lora_target_modules")
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as handle:
            return _json_list(handle.read(), f"peft_lora_target_modules file {text}")
    return [part.strip() for part in text.split(",") if part.strip()]


def _json_list(text: str, where: str) -> list:
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError("peft_lora_target_modules", f"{where} is not valid JSON ({error}); write a JSON array "
                                                      'such as ["to_q", "to_k"].') from error
    if not isinstance(parsed, list):
        raise ConfigError("peft_lora_target_modules", f"{where} must hold a JSON array of module names, "
                                                      f"not {type(parsed).__name__}.")
    return parsed


def lora_config(settings, target_modules: list[str]):
    """A ``peft.LoraConfig`` from the lora_* options; ``target_modules`` is the family default."""
    from peft import LoraConfig

    rank = int(settings.lora_rank)
    alpha = settings.lora_alpha if settings.lora_alpha is not None else rank
    init_type = settings.lora_init_type or "default"
    if init_type not in _INIT_WEIGHTS:
        raise ConfigError("lora_init_type", f"lora_init_type={init_type!r} is not one of {', '.join(_INIT_WEIGHTS)}.")
    extra: dict[str, Any] = {}
    if init_type == "loftq":
        extra["loftq_config"] = _loftq_config(settings)
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=float(settings.lora_dropout or 0.0),
        init_lora_weights=_INIT_WEIGHTS[init_type],
        use_dora=bool(settings.use_dora),
        target_modules=resolve_target_modules(settings, target_modules),
        **extra,
    )


def _loftq_config(settings):
    from peft import LoftQConfig

    if importlib.util.find_spec("scipy") is None:
        raise ConfigError("lora_init_type", "lora_init_type=loftq needs the scipy package for its 4-bit quantizer; "
                                            "install it with: pip install scipy, or choose lora_init_type=default.")
    if settings.base_model_precision not in (None, "no_change"):
        raise ConfigError("lora_init_type", f"lora_init_type=loftq quantizes the full-precision base weights itself, "
                                            f"so it cannot start from base_model_precision="
                                            f"{settings.base_model_precision}. Set base_model_precision=no_change "
                                            "or choose another lora_init_type.")
    return LoftQConfig(loftq_bits=_LOFTQ_BITS, loftq_iter=_LOFTQ_ITERATIONS)


def attach_lora(module: torch.nn.Module, settings, default_targets: list[str]) -> None:
    """Add a PEFT LoRA adapter to ``module`` in place; afterwards only adapter weights are trainable."""
    if settings.lora_type != "standard":
        raise ConfigError("lora_type", f"attach_lora builds PEFT adapters (lora_type=standard), not "
                                       f"lora_type={settings.lora_type}.")
    config = lora_config(settings, default_targets)
    _require_matches(module, config)
    if _is_diffusers_model(module):
        module.add_adapter(config, adapter_name=_ADAPTER_NAME)
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, module, adapter_name=_ADAPTER_NAME)


def _is_diffusers_model(module: torch.nn.Module) -> bool:
    try:
        from diffusers import ModelMixin
    except ImportError:
        return False
    return isinstance(module, ModelMixin) and hasattr(module, "add_adapter")


def _require_matches(module: torch.nn.Module, config) -> None:
    from peft.tuners.tuners_utils import check_target_module_exists

    names = [name for name, _ in module.named_modules() if name]
    if any(check_target_module_exists(config, name) for name in names):
        return
    layer_names = sorted({_short_name(name) for name, child in module.named_modules()
                          if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d))})
    raise ConfigError("peft_lora_target_modules",
                      f"No layer of {type(module).__name__} matches the LoRA target modules "
                      f"{sorted(config.target_modules)}. Layer names that exist include: "
                      f"{', '.join(layer_names[:_NAMES_SHOWN])}. Fix peft_lora_target_modules.")


def _short_name(name: str) -> str:
    """The part of a module path a target list would use: ``to_q``, or ``to_out.0`` for indexed children."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def lora_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (LoRA A/B, DoRA magnitudes) keyed as PEFT/diffusers save them."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(module, adapter_name=_ADAPTER_NAME)


def load_lora_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors saved by ``lora_state_dict`` into a module with the same adapter attached."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(module, state, adapter_name=_ADAPTER_NAME)
    missing = [key for key in result.missing_keys if "lora_" in key]
    if missing or result.unexpected_keys:
        raise ValueError(f"The saved adapter does not fit this model: {len(missing)} adapter tensors missing "
                         f"(e.g. {missing[:3]}), {len(result.unexpected_keys)} unexpected "
                         f"(e.g. {result.unexpected_keys[:3]}). Was it trained with other target modules?")


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters that require gradients. Call once after attaching and keep the list."""
    return [parameter for parameter in module.parameters() if parameter.requires_grad]
