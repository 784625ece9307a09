"""Quantising frozen weights: the denoiser under a LoRA (base_model_precision) and each text encoder
(text_encoder_N_precision).

With quantize_via=cpu or accelerator this setup step quantises the loaded modules with one of three
backends: optimum-quanto (``quantize`` then ``freeze``, which swaps Linear and Conv layers for quanto
QModules holding int8/int4/int2/fp8 weights), torchao (``quantize_``, which swaps Linear weights for
torchao tensor subclasses) or bitsandbytes (nf4.py: Linear layers become NF4 ``Linear4bit``). PEFT
attaches a LoRA to all three: quanto's QLinear is an ``nn.Linear`` subclass and PEFT has dedicated
torchao and bitsandbytes LoRA layers.

With quantize_via=pipeline the family loaders quantised the components already
(models/load_quantization.py); this step only checks that each one asked for really was. A .gguf
denoiser file arrives quantised the same way.

Every setting that cannot work is refused by quantization_checks.py, before loading when the config
is validated and again here.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from simpletuner.config import hardware
from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.models.load_quantization import loader_quantised
from simpletuner.models.quantization_plan import NO_CHANGE, component_names, plan
from simpletuner.training.quantization_checks import denoiser_trains_fully, gguf_denoiser_option, \
    quantization_problems

__all__ = ["NO_CHANGE", "denoiser_trains_fully", "quantize_components", "quantize_module", "stored_bytes",
           "text_encoder_option"]

logger = logging.getLogger("simpletuner.quantization")

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
BNB_LEVELS = ("nf4-bnb",)


def text_encoder_option(slot: int) -> str:
    """The option that sets the precision of text encoder ``slot`` (0-based)."""
    return f"text_encoder_{slot + 1}_precision"


def quantize_components(family, components, settings: Settings, device) -> None:
    """Setup step: quantise the denoiser and text encoders that their precision options name
    (quantize_via=cpu/accelerator), or check that the loader did (quantize_via=pipeline, .gguf)."""
    problems = quantization_problems(settings, family)
    if problems:
        raise problems[0]
    gguf_option = gguf_denoiser_option(settings, family)
    if gguf_option:
        _log_loader_quantised(gguf_option, components.denoiser)
    options = component_names(family)
    modules = dict(zip(options, [components.denoiser, *components.text_encoders]))
    for component, quantization in plan(settings, family).items():
        option, module = options[component], modules[component]
        if settings.quantize_via == "pipeline":
            _require_loader_quantised(component, option, module)
            if quantization.backend == "bitsandbytes":
                from simpletuner.training.nf4 import limit_packed_cpu_kernel

                limit_packed_cpu_kernel(module)
            _log_loader_quantised(option, module)
            continue
        check_level(option, quantization.level, settings)
        before = stored_bytes(module)
        quantize_module(module, quantization.level, settings.quantize_via, device)
        logger.info("%s=%s: %s weights %.2f MB -> %.2f MB", option, quantization.level, type(module).__name__,
                    before / 2**20, stored_bytes(module) / 2**20)


def _require_loader_quantised(component: str, option: str, module: torch.nn.Module) -> None:
    if not loader_quantised(module):
        raise ConfigError(option, f"{option} (quantize_via=pipeline) asked to quantise {component} while loading, "
                                  f"but its loader could not: a {component} read from a single-file checkpoint "
                                  "loads without a quantization config. Use quantize_via=cpu or accelerator.")


def _log_loader_quantised(option: str, module: torch.nn.Module) -> None:
    logger.info("%s: %s loaded quantised, %.2f MB of weights", option, type(module).__name__,
                stored_bytes(module) / 2**20)


def check_level(option: str, level: str, settings: Settings) -> None:
    """Raise ConfigError when ``level`` cannot run here (hardware or a missing package)."""
    from simpletuner.config.options import OPTIONS

    requirement = OPTIONS[option].gated_choices.get(level)  # the option table names each level's hardware
    needs = hardware.unmet(requirement) if requirement else None
    if needs:
        raise ConfigError(option, f"{option}={level} needs {needs}, which this machine does not have. Choose "
                                  "int8-quanto or int8-torchao (both run anywhere) or run on hardware that has it.")
    if level == "int4-torchao" and importlib.util.find_spec("mslk") is None:
        raise ConfigError(option, f"{option}=int4-torchao needs torchao's int4 kernels (the mslk package, "
                                  "version 1.0 or newer). Install it or choose int4-quanto.")
    if level not in QUANTO_WEIGHTS and level not in TORCHAO_CONFIGS and level not in BNB_LEVELS:
        raise ConfigError(option, f"{option}={level!r} is not a quantisation level; choose one of "
                                  f"{', '.join([NO_CHANGE, *QUANTO_WEIGHTS, *TORCHAO_CONFIGS, *BNB_LEVELS])}.")


def quantize_module(module: torch.nn.Module, level: str, quantize_via: str, device) -> None:
    """Quantise ``module``'s weights in place, on the CPU or on ``device`` (quantize_via), and leave it on device."""
    where = torch.device("cpu") if quantize_via == "cpu" else torch.device(device)
    module.to(where)
    if level in QUANTO_WEIGHTS:
        _quantize_with_quanto(module, QUANTO_WEIGHTS[level])
    elif level in BNB_LEVELS:
        from simpletuner.training.nf4 import quantize_to_nf4

        quantize_to_nf4(module, where)
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
        return tensor.numel() * tensor.element_size() + _quant_state_bytes(tensor)
    inner_names, _ = flatten()
    return sum(_tensor_bytes(getattr(tensor, name)) for name in inner_names)


def _quant_state_bytes(tensor: torch.Tensor) -> int:
    """The block scales bitsandbytes keeps beside a 4-bit weight (its quant_state), 0 for other tensors."""
    state = getattr(tensor, "quant_state", None)
    if state is None or not hasattr(state, "as_dict"):
        return 0
    return sum(value.numel() * value.element_size() for value in state.as_dict(packed=True).values()
               if isinstance(value, torch.Tensor))
