"""Quantising frozen weights after loading: the denoiser under a LoRA (base_model_precision)
and each text encoder (text_encoder_N_precision).

Two backends run here: optimum-quanto (``quantize`` then ``freeze``, which swaps Linear and
Conv layers for quanto QModules holding int8/int4/int2/fp8 weights) and torchao
(``quantize_``, which swaps Linear weights for torchao tensor subclasses). PEFT attaches a
LoRA to both afterwards: quanto's QLinear is an ``nn.Linear`` subclass and PEFT has a
dedicated torchao LoRA layer.

Levels that need hardware this machine lacks stop with the requirement named, and
``quantize_via=pipeline`` (quantising inside diffusers' loader) is not built: the option
table lists it as a planned choice.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from simpletuner.config import hardware
from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings

logger = logging.getLogger("simpletuner.quantization")

NO_CHANGE = "no_change"
# level -> the optimum.quanto weight qtype attribute
QUANTO_WEIGHTS = {
    "int8-quanto": "qint8",
    "int4-quanto": "qint4",
    "int2-quanto": "qint2",
    "fp8-quanto": "qfloat8",
    "fp8uz-quanto": "qfloat8_e4m3fnuz",
}
# level -> the torchao.quantization config class (weight-only: the frozen base keeps full-precision activations)
TORCHAO_CONFIGS = {
    "int8-torchao": "Int8WeightOnlyConfig",
    "int4-torchao": "Int4WeightOnlyConfig",
    "fp8-torchao": "Float8WeightOnlyConfig",
}
# lora_init_type values that rewrite the base weights, which a quantised base cannot take
_BASE_REWRITING_INITS = ("pissa", "olora")


def text_encoder_option(slot: int) -> str:
    """The option that sets the precision of text encoder ``slot`` (0-based)."""
    return f"text_encoder_{slot + 1}_precision"


def quantize_components(family, components, settings: Settings, device) -> None:
    """Setup step: quantise the denoiser and text encoders that their precision options name."""
    for option, level, module in _targets(family, components, settings):
        check_level(option, level, settings)
        before = stored_bytes(module)
        quantize_module(module, level, settings.quantize_via, device)
        logger.info("%s=%s: %s weights %.2f MB -> %.2f MB", option, level, type(module).__name__,
                    before / 2**20, stored_bytes(module) / 2**20)


def _targets(family, components, settings: Settings) -> list[tuple[str, str, torch.nn.Module]]:
    targets = []
    base_level = settings.base_model_precision or NO_CHANGE
    if base_level != NO_CHANGE:
        _check_base_can_be_quantised(settings, base_level)
        targets.append(("base_model_precision", base_level, components.denoiser))
    for slot in range(4):
        option = text_encoder_option(slot)
        level = getattr(settings, option) or NO_CHANGE
        if level == NO_CHANGE:
            continue
        if slot >= len(components.text_encoders):
            raise ConfigError(option, f"{option}={level}, but model_family={family.name} has "
                                      f"{len(components.text_encoders)} text encoder(s). Remove {option}.")
        if settings.train_text_encoder:
            raise ConfigError(option, f"{option}={level} quantises a text encoder that train_text_encoder=true "
                                      "would train. Set train_text_encoder=false or remove the precision option.")
        targets.append((option, level, components.text_encoders[slot]))
    return targets


def denoiser_trains_fully(settings: Settings) -> bool:
    """model_type=full trains the denoiser itself, unless a ControlNet is what trains (the denoiser stays frozen)."""
    return settings.model_type == "full" and not settings.controlnet


def _check_base_can_be_quantised(settings: Settings, level: str) -> None:
    if denoiser_trains_fully(settings):
        raise ConfigError("base_model_precision", f"base_model_precision={level} quantises the denoiser, but "
                                                  "model_type=full trains every one of its weights and quantised "
                                                  "weights cannot be trained. Use model_type=lora, or set "
                                                  "base_model_precision=no_change.")
    if level in TORCHAO_CONFIGS and settings.model_type == "lora" and settings.lora_type == "lycoris":
        raise ConfigError("base_model_precision", f"lora_type=lycoris adds its update to each base weight, which "
                                                  f"torchao's quantised tensors ({level}) cannot do. Use int8-quanto.")
    init_type = settings.lora_init_type or "default"
    if init_type in _BASE_REWRITING_INITS:
        raise ConfigError("lora_init_type", f"lora_init_type={init_type} rewrites the base weights, which "
                                            f"base_model_precision={level} has quantised. Choose lora_init_type="
                                            "default or gaussian, or set base_model_precision=no_change.")
    if level == "int4-torchao" and settings.model_type == "lora":
        raise ConfigError("base_model_precision", "base_model_precision=int4-torchao cannot carry a LoRA: PEFT's "
                                                  "torchao LoRA layer supports int8 weights only. Use int8-torchao "
                                                  "or int4-quanto.")


def check_level(option: str, level: str, settings: Settings) -> None:
    """Raise ConfigError when ``level`` cannot run here (hardware, package, or a loader-time level)."""
    from simpletuner.config.options import OPTIONS

    requirement = OPTIONS[option].gated_choices.get(level)  # the option table names each level's hardware
    needs = hardware.unmet(requirement) if requirement else None
    if needs:
        raise ConfigError(option, f"{option}={level} needs {needs}, which this machine does not have. Choose "
                                  "int8-quanto or int8-torchao (both run anywhere) or run on hardware that has it.")
    if settings.quantize_via == "pipeline":
        raise ConfigError("quantize_via", "quantize_via=pipeline (quantising inside diffusers' loader) is not "
                                          "implemented yet. Use quantize_via=cpu or accelerator.")
    if level == "nf4-bnb":
        raise ConfigError(option, f"{option}=nf4-bnb is applied by diffusers' loader (quantize_via=pipeline), "
                                  "which is not implemented yet. Choose int4-quanto or int8-quanto.")
    if level == "int4-torchao" and importlib.util.find_spec("mslk") is None:
        raise ConfigError(option, f"{option}=int4-torchao needs torchao's int4 kernels (the mslk package, "
                                  "version 1.0 or newer). Install it or choose int4-quanto.")
    if level not in QUANTO_WEIGHTS and level not in TORCHAO_CONFIGS:
        raise ConfigError(option, f"{option}={level!r} is not a quantisation level; choose one of "
                                  f"{', '.join([NO_CHANGE, *QUANTO_WEIGHTS, *TORCHAO_CONFIGS])}.")


def quantize_module(module: torch.nn.Module, level: str, quantize_via: str, device) -> None:
    """Quantise ``module``'s weights in place, on the CPU or on ``device`` (quantize_via), and leave it on device."""
    where = torch.device("cpu") if quantize_via == "cpu" else torch.device(device)
    module.to(where)
    if level in QUANTO_WEIGHTS:
        _quantize_with_quanto(module, QUANTO_WEIGHTS[level])
    else:
        _quantize_with_torchao(module, TORCHAO_CONFIGS[level])
    module.to(device)


def _quantize_with_quanto(module: torch.nn.Module, qtype_name: str) -> None:
    import optimum.quanto as quanto

    quanto.quantize(module, weights=getattr(quanto, qtype_name))
    quanto.freeze(module)  # replaces the float weights with their quantised form


def _quantize_with_torchao(module: torch.nn.Module, config_name: str) -> None:
    import torchao.quantization as torchao_quantization

    torchao_quantization.quantize_(module, getattr(torchao_quantization, config_name)())


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes held by the module's parameters, counting the inner tensors of quantised ones."""
    return sum(_tensor_bytes(parameter) for parameter in module.parameters())


def _tensor_bytes(tensor: torch.Tensor) -> int:
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return tensor.numel() * tensor.element_size()
    inner_names, _ = flatten()
    return sum(_tensor_bytes(getattr(tensor, name)) for name in inner_names)
