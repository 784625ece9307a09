"""Attaching a run's validation adapters to the live model for a few renders, then removing every trace.

Adapters load through the family pipeline's ``load_lora_weights`` under their
own names, so a file's text-encoder layers load too; they are then activated
beside the trained PEFT adapter (if any) with their strengths. The pipeline
and the training model share modules, so afterwards the extra adapters are
deleted, LoRA wrappers left empty are replaced by the layers they wrapped,
and active adapters, scales and ``requires_grad`` flags are put back:
checkpoints, saved outputs and the next training step see the model exactly
as before. ComfyUI-layout files written by this trainer are converted first.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch

from simpletuner.config.errors import ConfigError
from simpletuner.training import comfyui_format
from simpletuner.validation.adapter_specs import AdapterFile, AdapterRun

logger = logging.getLogger("simpletuner.validation")

_LYCORIS_PREFIX = "lycoris_"


def adapter_option(settings) -> str:
    return "validation_adapter_config" if settings.validation_adapter_config else "validation_adapter_path"


@contextmanager
def run_attached(family, denoiser: torch.nn.Module, run: AdapterRun, option: str) -> Iterator[None]:
    """Inside the block the pipeline-shared modules compute with ``run``'s adapters added."""
    if run.is_base:
        yield
        return
    pipeline = family.build_pipeline(denoiser=denoiser)
    modules = _lora_modules(pipeline)
    saved = _SavedState(modules)
    trained = list(getattr(denoiser, "peft_config", None) or {})
    existing = {id(sub) for module in modules.values() for sub in module.modules()}
    loaded: list[str] = []
    try:
        for adapter in run.adapters:
            if adapter.adapter_name in trained:
                raise ConfigError(option, f"{option}: adapter name {adapter.adapter_name!r} is already used by the "
                                          "trained adapter; give the validation adapter another name.")
            _load(pipeline, denoiser, family.denoiser_subfolder, adapter, option)
            loaded.append(adapter.adapter_name)
        weights = [1.0] * len(trained) + [adapter.strength for adapter in run.adapters]
        pipeline.set_adapters(trained + loaded, weights)
        for module in modules.values():  # new layers start in training mode (LoRA dropout would be active)
            for sub in module.modules():
                if id(sub) not in existing:
                    sub.eval()
        yield
    finally:
        if loaded:
            pipeline.delete_adapters(loaded)
        saved.restore(modules)


def check_runs(family, denoiser: torch.nn.Module, runs: list[AdapterRun], option: str) -> None:
    """Attach and detach every run once, so a bad file stops the run at start rather than mid-training."""
    for run in runs:
        with run_attached(family, denoiser, run, option):
            pass
        logger.info("Validation adapter run %r: %s", run.label,
                    ", ".join(f"{a.adapter_name} x{a.strength:g}" for a in run.adapters) or "no adapters")


def _lora_modules(pipeline) -> dict[str, torch.nn.Module]:
    names = getattr(pipeline, "_lora_loadable_modules", ())
    modules = {name: getattr(pipeline, name, None) for name in names}
    return {name: module for name, module in modules.items() if isinstance(module, torch.nn.Module)}


def _load(pipeline, denoiser: torch.nn.Module, component: str, adapter: AdapterFile, option: str) -> None:
    if not hasattr(pipeline, "load_lora_weights"):
        raise ConfigError(option, f"{option}: {type(pipeline).__name__} cannot load LoRA weights, so validation "
                                  "adapters are not available for this model family.")
    try:
        if not adapter.is_local:
            pipeline.load_lora_weights(adapter.location, weight_name=adapter.weight_name,
                                       adapter_name=adapter.adapter_name)
            return
        converted = _converted_comfyui(adapter.local_file, denoiser, component, option)
        if converted is not None:
            pipeline.load_lora_weights(converted, adapter_name=adapter.adapter_name)
        else:
            pipeline.load_lora_weights(adapter.local_file, adapter_name=adapter.adapter_name)
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        raise ConfigError(option, f"{option}: could not load {adapter.location} as a LoRA for "
                                  f"{type(pipeline).__name__} ({error}). It must be a LoRA trained for this "
                                  "model family.") from error
    present = set(getattr(denoiser, "peft_config", None) or {})
    if adapter.adapter_name not in present:
        raise ConfigError(option, f"{option}: {adapter.location} holds no LoRA layer of this model's "
                                  f"{component}; it was trained for another model family.")


def _converted_comfyui(path: str, denoiser: torch.nn.Module, component: str,
                       option: str) -> dict[str, torch.Tensor] | None:
    """This trainer's ComfyUI layout as diffusers tensors (alpha folded into lora_B), else None."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise ConfigError(option, f"{option}: {path} is not a readable .safetensors file ({error}).") from error
    if any(key.startswith(_LYCORIS_PREFIX) for key in keys):
        raise ConfigError(option, f"{option}: {path} is a LyCORIS network; validation adapters must be LoRA files "
                                  "(diffusers, PEFT or ComfyUI layout).")
    if not any(key.startswith(comfyui_format.COMFYUI_PREFIX) for key in keys):
        return None
    tensors, _ = comfyui_format.read_lora_file(path)
    state, alphas = comfyui_format.comfyui_to_peft(tensors)
    layers = {comfyui_format.split_key(key)[0] for key in state}
    if not all(_has_module(denoiser, layer) for layer in layers):
        return None  # another tool's ComfyUI naming: diffusers' own converters may know it
    for key in list(state):
        layer, part = comfyui_format.split_key(key)
        if part == "lora_B.weight" and layer in alphas:
            rank = state[f"{layer}.lora_A.weight"].shape[0]
            state[key] = state[key] * (alphas[layer] / rank)
    return {f"{component}.{key}": tensor for key, tensor in state.items()}


def _has_module(module: torch.nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


class _SavedState:
    """What loading adapters changes on the shared modules, captured to put back afterwards."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.flags = [(p, p.requires_grad) for module in modules.values() for p in module.parameters()]
        self.layers = [(layer, list(layer.active_adapters), dict(getattr(layer, "scaling", {})))
                       for module in modules.values() for layer in module.modules()
                       if isinstance(layer, BaseTunerLayer)]
        self.peft = {name: ("peft_config" in vars(module), getattr(module, "_hf_peft_config_loaded", None))
                     for name, module in modules.items()}

    def restore(self, modules: dict[str, torch.nn.Module]) -> None:
        for name, module in modules.items():
            _unwrap_empty_layers(module)
            had_config, loaded_flag = self.peft[name]
            if not had_config and "peft_config" in vars(module):
                del module.peft_config
            if hasattr(module, "_hf_peft_config_loaded"):
                module._hf_peft_config_loaded = loaded_flag
        for layer, active, scaling in self.layers:
            layer.set_adapter(active)
            if scaling:
                layer.scaling.update({name: value for name, value in scaling.items() if name in layer.scaling})
        for parameter, flag in self.flags:
            parameter.requires_grad_(flag)


def _unwrap_empty_layers(module: torch.nn.Module) -> None:
    """Replace LoRA wrappers that hold no adapter any more by the layer they wrap."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    empty = [name for name, layer in module.named_modules()
             if isinstance(layer, BaseTunerLayer) and not any(len(getattr(layer, attribute))
                                                              for attribute in layer.adapter_layer_names)]
    for name in empty:
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attribute, getattr(parent, attribute).get_base_layer())
