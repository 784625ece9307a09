"""Quantisation settings a run cannot honour, found before any model loads.

Covers the precision levels, quantize_via=pipeline with quantization_config, and .gguf denoiser
files. ``validate.py`` reports these with the other config errors; the quantisation setup step
raises the first one, so a run started without validation stops the same way.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from simpletuner.config import hardware
from simpletuner.config.errors import ConfigError
from simpletuner.models.load_quantization import is_gguf_file, library_config
from simpletuner.models.quantization_plan import NO_CHANGE, OPTION, Quantization, component_names, plan, \
    torchao_config_name

MAX_TEXT_ENCODERS = 4
# lora_init_type values that rewrite the base weights, which a quantised base cannot take
BASE_REWRITING_INITS = ("pissa", "olora")


def denoiser_trains_fully(settings) -> bool:
    """model_type=full trains the denoiser itself, unless a ControlNet is what trains (the denoiser stays frozen)."""
    return settings.model_type == "full" and not settings.controlnet


def gguf_denoiser_option(settings, family) -> str | None:
    """The option naming a .gguf denoiser file, if one does."""
    for option in (f"pretrained_{family.denoiser_subfolder}_model_name_or_path", "pretrained_model_name_or_path"):
        if is_gguf_file(getattr(settings, option, None)):
            return option
    return None


def quantization_problems(settings, family) -> list[ConfigError]:
    """Every quantisation problem of ``settings`` for ``family`` (a ModelFamily class or instance)."""
    try:
        planned = plan(settings, family)
    except ConfigError as error:
        return [error]
    problems = _slot_problems(settings, family)
    denoiser = family.denoiser_subfolder
    gguf_option = gguf_denoiser_option(settings, family)
    if gguf_option:
        problems += _gguf_problems(settings, family, gguf_option, planned.get(denoiser))
    base = planned.get(denoiser)
    if base is not None or gguf_option:
        source = gguf_option or ("base_model_precision" if base.level else OPTION)
        loader = bool(gguf_option) or settings.quantize_via == "pipeline"
        problems += _frozen_base_problems(settings, base, source, loader)
    for component, quantization in planned.items():
        option = component_names(family)[component] if quantization.level else OPTION
        if component != denoiser and settings.train_text_encoder:
            problems.append(ConfigError(option, f"{option} quantises {component}, which train_text_encoder=true "
                                                "would train. Set train_text_encoder=false or leave it unquantised."))
        if settings.quantize_via == "pipeline":
            problems += _loader_problems(component, component == denoiser, quantization, option)
    if settings.quantize_via == "pipeline" and base is not None and single_file_denoiser(settings, family):
        source = single_file_denoiser(settings, family)
        problems.append(ConfigError("quantize_via", f"quantize_via=pipeline cannot quantise the denoiser read from "
                                                    f"the single file {source}: diffusers' single-file loader does not "
                                                    "apply quantisation configs reliably (it drops quanto's weights and "
                                                    "leaves torchao's unapplied). Use quantize_via=cpu or accelerator, "
                                                    "or a diffusers folder."))
    return problems


def single_file_denoiser(settings, family) -> str | None:
    """The .safetensors/.ckpt file the denoiser is read from, if it is read from one."""
    from simpletuner.models.sdxl import is_single_file

    source = getattr(settings, f"pretrained_{family.denoiser_subfolder}_model_name_or_path", None) \
        or settings.pretrained_model_name_or_path
    return source if source and is_single_file(str(source)) else None


def _slot_problems(settings, family) -> list[ConfigError]:
    problems = []
    for slot in range(len(family.text_encoder_attributes), MAX_TEXT_ENCODERS):
        option = f"text_encoder_{slot + 1}_precision"
        level = getattr(settings, option) or NO_CHANGE
        if level != NO_CHANGE:
            problems.append(ConfigError(option, f"{option}={level}, but model_family={family.name} has "
                                                f"{len(family.text_encoder_attributes)} text encoder(s). Remove {option}."))
    return problems


def _frozen_base_problems(settings, quantization: Quantization | None, source: str, loader: bool) -> list[ConfigError]:
    """The denoiser's weights are quantised (by a level, quantization_config or a .gguf file): what cannot train."""
    what = f"{source} quantises the denoiser"
    backend = quantization.backend if quantization else "gguf"
    problems = []
    if denoiser_trains_fully(settings):
        problems.append(ConfigError(source, f"{what}, but model_type=full trains every one of its weights and "
                                            "quantised weights cannot be trained. Use model_type=lora, or leave the "
                                            "denoiser unquantised."))
    lycoris = settings.model_type == "lora" and settings.lora_type == "lycoris"
    if lycoris and backend != "quanto":
        problems.append(ConfigError(source, f"lora_type=lycoris adds its update to each base weight, which "
                                            f"{backend}'s quantised weights cannot take. Use int8-quanto."))
    init_type = settings.lora_init_type or "default"
    if init_type in BASE_REWRITING_INITS:
        problems.append(ConfigError("lora_init_type", f"lora_init_type={init_type} rewrites the base weights, "
                                                      f"which {what} and so cannot change. Choose lora_init_type="
                                                      "default or gaussian, or leave the denoiser unquantised."))
    if backend == "torchao" and settings.model_type == "lora" and not lycoris:
        name = torchao_config_name(quantization)
        if not name.startswith("Int8"):
            problems.append(ConfigError(source, f"{what} with torchao's {name}, which cannot carry a LoRA: PEFT's "
                                                "torchao LoRA layer supports int8 weights only. Use int8-torchao "
                                                "or int4-quanto."))
    if loader and (settings.controlnet or settings.control):
        what_trains = "controlnet=true copies its ControlNet from" if settings.controlnet else "control=true widens"
        problems.append(ConfigError(source, f"{what_trains} the full-precision denoiser before it is quantised, "
                                            f"but {source} quantises it while loading. Use quantize_via=cpu or "
                                            "accelerator with base_model_precision, and a non-.gguf base model."))
    return problems


def _gguf_problems(settings, family, option: str, quantization: Quantization | None) -> list[ConfigError]:
    path = getattr(settings, option)
    if option not in family.gguf_options:
        where = (f"; give it as {family.gguf_options[0]} and keep pretrained_model_name_or_path at the base model"
                 if family.gguf_options else "")
        return [ConfigError(option, f"{option}={path!r} is a .gguf file, which model_family={family.name} cannot "
                                    f"read there{where or ' (diffusers has no single-file loader for its denoiser)'}.")]
    if not os.path.isfile(path):
        return [ConfigError(option, f"{option}={path!r} names a .gguf file that does not exist; fix the path.")]
    if importlib.util.find_spec("gguf") is None:
        return [ConfigError(option, f"{option}={path!r} is a .gguf file; reading it needs the gguf package "
                                    "(pip install gguf).")]
    if quantization is not None:
        return [ConfigError(option, f"{option}={path!r} is already quantised (GGUF), so the denoiser cannot be "
                                    "quantised again; set base_model_precision=no_change and drop its "
                                    f"{OPTION} entry.")]
    return []


def _loader_problems(component: str, is_denoiser: bool, quantization: Quantization, option: str) -> list[ConfigError]:
    """quantize_via=pipeline: the component's config must build, and its backend must run here."""
    if quantization.backend == "bitsandbytes":
        needs = hardware.unmet("bitsandbytes_loader" if is_denoiser else "bitsandbytes")
        if needs:
            return [ConfigError(option, f"{option} quantises {component} with bitsandbytes while loading, which "
                                        f"needs {needs}; this machine does not have it. Use quantize_via=cpu, which "
                                        "runs nf4-bnb on any device bitsandbytes supports.")]
    try:
        library_config(quantization, "diffusers" if is_denoiser else "transformers", torch.bfloat16)
    except ConfigError as error:
        return [ConfigError(OPTION if option == OPTION else option, f"{component}: {error}")]
    return []
