"""init_lora: start a PEFT LoRA from an existing LoRA file (diffusers or ComfyUI layout).

The file's denoiser tensors are copied into the freshly attached adapter.
When the file was trained with another alpha / rank scale than this run's
(lora_alpha / lora_rank), its lora_B matrices are rescaled so the starting
update equals the file's. Layers the file lacks keep their fresh
initialisation; tensors for layers this adapter does not have are an error.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from simpletuner.config.errors import ConfigError
from simpletuner.training import adapters, comfyui_format

logger = logging.getLogger(__name__)

_DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
_LYCORIS_PREFIX = "lycoris_"


def read_initial_lora(path: str, component: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(PEFT state of the denoiser, layer -> update scale) from a LoRA file; scale = alpha / rank."""
    if not path or not os.path.isfile(path):
        raise ConfigError("init_lora", f"init_lora={path!r}: no such file. Point init_lora at a LoRA "
                                       ".safetensors file (diffusers or ComfyUI layout).")
    from safetensors import SafetensorError

    try:
        tensors, metadata = comfyui_format.read_lora_file(path)
    except (SafetensorError, OSError) as error:
        raise ConfigError("init_lora", f"init_lora file {path} is not a readable .safetensors file "
                                       f"({error}).") from error
    if any(key.startswith(_LYCORIS_PREFIX) for key in tensors):
        raise ConfigError("init_lora", f"init_lora file {path} holds a LyCORIS network; start from it with "
                                       "lora_type=lycoris (and the lycoris_config it was trained with).")
    try:
        if comfyui_format.is_comfyui_lora(tensors):
            state, alphas = comfyui_format.comfyui_to_peft(tensors)
        else:
            state, others = comfyui_format.denoiser_state(tensors, component)
            if others:
                logger.warning("init_lora: %s also holds %s tensors; only the %s's are loaded",
                               path, ", ".join(sorted(others)), component)
            alphas = _diffusers_alphas(metadata, component, state)
    except ValueError as error:
        raise ConfigError("init_lora", f"init_lora file {path} is not a LoRA this trainer can read: {error}.") \
            from error
    if not state:
        raise ConfigError("init_lora", f"init_lora file {path} holds no LoRA tensors for the {component}.")
    return state, _scales(state, alphas)


def _diffusers_alphas(metadata: dict[str, str], component: str, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-layer alpha from the diffusers adapter metadata; without it loaders take alpha == rank."""
    raw = metadata.get(_DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    config = json.loads(raw)
    alpha = config.get(f"{component}.lora_alpha")
    if alpha is None:
        return {}
    patterns = config.get(f"{component}.alpha_pattern") or {}
    alphas = {}
    for key in state:
        layer, part = comfyui_format.split_key(key)
        if part == "lora_A.weight":
            alphas[layer] = next((value for name, value in patterns.items() if layer.endswith(name)), alpha)
    return alphas


def _scales(state: dict[str, torch.Tensor], alphas: dict[str, float]) -> dict[str, float]:
    scales = {}
    for key, tensor in state.items():
        layer, part = comfyui_format.split_key(key)
        if part == "lora_A.weight":
            rank = tensor.shape[0]
            scales[layer] = float(alphas.get(layer, rank)) / rank
    return scales


def load_initial_lora(module: torch.nn.Module, settings, component: str) -> int:
    """Copy the init_lora file into the adapter attached to ``module``; returns the layers loaded."""
    state, file_scales = read_initial_lora(settings.init_lora, component)
    current = adapters.lora_state_dict(module)
    _check_fit(state, current, settings)
    rank = int(settings.lora_rank)
    our_scale = float(settings.lora_alpha if settings.lora_alpha is not None else rank) / rank
    rescaled = 0
    for layer, scale in file_scales.items():
        key = f"{layer}.lora_B.weight"
        if key in state and abs(scale - our_scale) > 1e-12 * max(scale, our_scale):
            state[key] = state[key] * (scale / our_scale)
            rescaled += 1
    if rescaled:
        logger.info("init_lora: rescaled %d lora_B matrices from the file's alpha/rank to this run's %.4g",
                    rescaled, our_scale)
    missing = sorted(set(current) - set(state))
    if missing:
        logger.warning("init_lora: %d adapter tensors are not in %s and keep their fresh values (e.g. %s)",
                       len(missing), settings.init_lora, missing[:3])
    adapters.load_lora_state(module, {**current, **state})
    return len(file_scales)


def _check_fit(state: dict[str, torch.Tensor], current: dict[str, torch.Tensor], settings) -> None:
    path = settings.init_lora
    unexpected = sorted(set(state) - set(current))
    if unexpected:
        dora = any(key.endswith("lora_magnitude_vector") for key in unexpected)
        fix = ("it was trained with DoRA: set use_dora=true" if dora else
               "set peft_lora_target_modules to the layers it was trained on")
        raise ConfigError("init_lora", f"init_lora file {path} has {len(unexpected)} tensors for layers this "
                                       f"adapter does not train (e.g. {unexpected[:3]}); {fix}.")
    mismatched = [key for key in state if state[key].shape != current[key].shape]
    if mismatched:
        key = mismatched[0]
        raise ConfigError("init_lora", f"init_lora file {path} does not fit: {key} has shape "
                                       f"{tuple(state[key].shape)}, the adapter's is {tuple(current[key].shape)}. "
                                       f"Set lora_rank to the file's rank (now {settings.lora_rank}).")
