"""Quantising while loading: the keywords a family adds to its denoiser / text-encoder loading calls.

With quantize_via=pipeline each component's quantisation (quantization_plan.py) becomes the
``quantization_config`` of its ``from_pretrained`` / ``from_single_file`` call: diffusers'
QuantoConfig / TorchAoConfig / BitsAndBytesConfig for the denoiser, transformers' for the text
encoders. A ``.gguf`` denoiser file is already quantised; it loads through ``from_single_file`` with
diffusers' GGUFQuantizationConfig whatever quantize_via says.

Families call ``ModelFamily.quantization_load_kwargs`` (base.py), which lands here, so every family
quantises the same way.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch

from simpletuner.config.errors import ConfigError
from simpletuner.models.quantization_plan import OPTION, Quantization, plan, torchao_config_name

GGUF_SUFFIX = ".gguf"


def is_gguf_file(path: str | None) -> bool:
    return bool(path) and str(path).lower().endswith(GGUF_SUFFIX)


def load_kwargs(family, component: str, dtype: torch.dtype) -> dict[str, Any]:
    """``{"quantization_config": ...}`` for ``component``'s loading call, or {} when it loads unquantised."""
    if family.settings.quantize_via != "pipeline":
        return {}
    quantization = plan(family.settings, family).get(component)
    if quantization is None:
        return {}
    library = "diffusers" if component == family.denoiser_subfolder else "transformers"
    return {"quantization_config": library_config(quantization, library, dtype)}


def gguf_load_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """``from_single_file`` keywords for a .gguf file: its blocks stay quantised and compute in ``dtype``."""
    from diffusers import GGUFQuantizationConfig

    return {"quantization_config": GGUFQuantizationConfig(compute_dtype=dtype), "torch_dtype": dtype}


def library_config(quantization: Quantization, library: str, dtype: torch.dtype):
    """The diffusers or transformers config object for one component's quantisation."""
    module = importlib.import_module(library)
    options = dict(quantization.options)
    if quantization.backend == "quanto":
        weights = options.pop("weights_dtype", options.pop("weights", "int8"))
        options["weights_dtype" if library == "diffusers" else "weights"] = weights
        return _construct(module.QuantoConfig, options)
    if quantization.backend == "torchao":
        options["quant_type"] = torchao_config(quantization)
        return _construct(module.TorchAoConfig, options)
    if options.get("load_in_4bit"):
        options.setdefault("bnb_4bit_compute_dtype", dtype)
    return _construct(module.BitsAndBytesConfig, options)


def torchao_config(quantization: Quantization):
    """The torchao AOBaseConfig instance that quant_type describes."""
    import torchao.quantization as torchao_quantization

    name = torchao_config_name(quantization)
    config_class = getattr(torchao_quantization, name, None)
    if not isinstance(config_class, type):
        raise ConfigError(OPTION, f"quant_type {name!r} is not a torchao.quantization config class; use e.g. "
                                  "Int8WeightOnlyConfig, Int4WeightOnlyConfig or Float8WeightOnlyConfig.")
    quant_type = quantization.options.get("quant_type")
    arguments = {key: value for key, value in quant_type.items() if key != "type"} if isinstance(quant_type, dict) else {}
    return _construct(config_class, arguments)


def _construct(config_class, options: dict[str, Any]):
    """``config_class(**options)``, refusing keywords the class does not take (the classes swallow them)."""
    parameters = inspect.signature(config_class.__init__).parameters
    named = {name for name, parameter in parameters.items() if parameter.kind is not parameter.VAR_KEYWORD}
    unknown = sorted(set(options) - named)
    if unknown:
        raise ConfigError(OPTION, f"{config_class.__module__.split('.')[0]}'s {config_class.__name__} does not take "
                                  f"{', '.join(unknown)}; it takes: {', '.join(sorted(named - {'self'}))}.")
    try:
        return config_class(**options)
    except (TypeError, ValueError) as error:
        raise ConfigError(OPTION, f"{config_class.__name__}({options}) was refused: {error}. Fix the entry in "
                                  f"{OPTION}.") from None


def loader_quantised(module: torch.nn.Module) -> bool:
    """True when a diffusers / transformers loader quantised ``module`` (it keeps its quantizer)."""
    return getattr(module, "hf_quantizer", None) is not None
