"""ComfyUI LoRA key layout, and conversion to and from the diffusers/PEFT layout.

ComfyUI reads a LoRA layer as ``diffusion_model.<layer>.lora_A.weight`` and
``.lora_B.weight`` with a scalar ``diffusion_model.<layer>.alpha`` (the
update is scaled by alpha / rank); a DoRA magnitude is ``.dora_scale`` shaped
(out, 1, ...) (PEFT keeps it as (out,) for linear layers, (1, out, 1, 1)
for convolutions). Diffusers files prefix the same layers with their component
(``unet.`` / ``transformer.``), name the matrices ``lora_A``/``lora_B`` (PEFT)
or ``lora.down``/``lora.up`` (older UNet files) and keep alpha in metadata.

"PEFT state" below means what ``get_peft_model_state_dict`` returns: no
component prefix, ``lora_A``/``lora_B`` names, ``lora_magnitude_vector``.
Layer paths are kept as they are: ``<layer>`` is the diffusers module path.
"""

from __future__ import annotations

import json
import re
from typing import Mapping

import torch

from simpletuner.atomic_files import save_safetensors

COMFYUI_PREFIX = "diffusion_model."
DENOISER_COMPONENTS = ("unet", "transformer")
LORA_FILE = "pytorch_lora_weights.safetensors"

# Every tensor name a LoRA layer may carry, in any of the layouts; the layer path is what precedes it.
_KEY = re.compile(r"^(?P<layer>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|"
                  r"lora_down\.weight|lora_up\.weight|lora_A\.bias|lora_B\.bias|lora_magnitude_vector|"
                  r"dora_scale|alpha)$")
# Part names -> their PEFT spelling.
_PEFT_PART = {
    "lora.down.weight": "lora_A.weight", "lora_down.weight": "lora_A.weight",
    "lora.up.weight": "lora_B.weight", "lora_up.weight": "lora_B.weight",
    "dora_scale": "lora_magnitude_vector",
}


def split_key(key: str) -> tuple[str, str]:
    """(layer path, tensor part in PEFT spelling) for one LoRA tensor name."""
    match = _KEY.match(key)
    if match is None:
        raise ValueError(f"{key!r} is not a LoRA tensor name (expected <layer>.lora_A.weight, .lora_B.weight, "
                         ".lora.down.weight, .lora.up.weight, .lora_magnitude_vector, .dora_scale or .alpha)")
    part = match.group("part")
    return match.group("layer"), _PEFT_PART.get(part, part)


def is_comfyui_lora(state: Mapping[str, torch.Tensor]) -> bool:
    """True when the tensors use ComfyUI's ``diffusion_model.*`` keys."""
    return any(key.startswith(COMFYUI_PREFIX) for key in state)


# --- diffusers / PEFT -> ComfyUI ----------------------------------------------------------

def peft_to_comfyui(state: Mapping[str, torch.Tensor], alpha: float | Mapping[str, float]) -> dict[str, torch.Tensor]:
    """ComfyUI tensors for a PEFT state; ``alpha`` is lora_alpha, or a map layer -> alpha (default under "")."""
    converted: dict[str, torch.Tensor] = {}
    layers: dict[str, torch.Tensor] = {}  # layer -> lora_B, to shape DoRA magnitudes
    for key, tensor in state.items():
        layer, part = split_key(key)
        if part == "alpha":
            raise ValueError(f"{key!r}: a PEFT state carries no alpha tensors; pass alpha separately")
        if part == "lora_B.weight":
            layers[layer] = tensor
    for key, tensor in state.items():
        layer, part = split_key(key)
        if part == "lora_magnitude_vector":
            if layer not in layers:
                raise ValueError(f"{key!r} has no lora_B.weight beside it, so its DoRA scale cannot be shaped")
            ndim = layers[layer].dim()
            converted[f"{COMFYUI_PREFIX}{layer}.dora_scale"] = tensor.reshape(-1, *([1] * (ndim - 1)))
        else:
            converted[f"{COMFYUI_PREFIX}{layer}.{part}"] = tensor
    for layer in layers:
        converted[f"{COMFYUI_PREFIX}{layer}.alpha"] = torch.tensor(float(_alpha_for(alpha, layer)))
    return converted


def _alpha_for(alpha: float | Mapping[str, float], layer: str) -> float:
    if isinstance(alpha, Mapping):
        return alpha[layer] if layer in alpha else alpha[""]
    return alpha


def diffusers_to_comfyui(state: Mapping[str, torch.Tensor], alpha: float | Mapping[str, float],
                         component: str | None = None) -> dict[str, torch.Tensor]:
    """ComfyUI tensors for a diffusers LoRA file's denoiser tensors (text encoder tensors are refused)."""
    peft_state, others = denoiser_state(state, component)
    if others:
        raise ValueError(f"ComfyUI conversion covers the denoiser only; the state also holds {sorted(others)} "
                         "tensors")
    return peft_to_comfyui(peft_state, alpha)


def denoiser_state(state: Mapping[str, torch.Tensor], component: str | None = None
                   ) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(the denoiser's tensors as a PEFT state, prefixes of other components found).

    ``component`` is "unet" or "transformer"; None takes whichever of them is
    present. Keys without a component prefix are taken as already PEFT-keyed.
    """
    wanted = (component,) if component else DENOISER_COMPONENTS
    peft_state: dict[str, torch.Tensor] = {}
    others: set[str] = set()
    for key, tensor in state.items():
        head, _, rest = key.partition(".")
        if head in wanted:
            name = rest
        elif head in DENOISER_COMPONENTS or head.startswith("text_encoder"):
            others.add(head)
            continue
        else:
            name = key
        layer, part = split_key(name)
        peft_state[f"{layer}.{part}"] = tensor
    return peft_state, others


# --- ComfyUI -> diffusers / PEFT ----------------------------------------------------------

def comfyui_to_peft(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(PEFT state, layer -> alpha) from ComfyUI tensors; layers without .alpha are left out of the map."""
    peft_state: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, tensor in state.items():
        if not key.startswith(COMFYUI_PREFIX):
            raise ValueError(f"{key!r} is not a ComfyUI denoiser key (they start with {COMFYUI_PREFIX!r})")
        layer, part = split_key(key[len(COMFYUI_PREFIX):])
        if part == "alpha":
            alphas[layer] = float(tensor.item())
        elif part == "lora_magnitude_vector":
            peft_state[f"{layer}.{part}"] = _peft_magnitude(key, tensor)
        else:
            peft_state[f"{layer}.{part}"] = tensor
    return peft_state, alphas


def _peft_magnitude(key: str, dora_scale: torch.Tensor) -> torch.Tensor:
    """ComfyUI's per-output DoRA scale (out, 1[, 1, 1]) as PEFT holds it: (out,) for linear, (1, out, 1, 1) for conv."""
    if dora_scale.dim() < 2 or any(size != 1 for size in dora_scale.shape[1:]):
        raise ValueError(f"{key!r} has shape {tuple(dora_scale.shape)}; only per-output DoRA scales "
                         "(out, 1, ...) convert to PEFT's magnitude vector")
    if dora_scale.dim() == 2:
        return dora_scale.reshape(-1)
    return dora_scale.reshape(1, -1, *dora_scale.shape[2:])


def comfyui_to_diffusers(state: Mapping[str, torch.Tensor], component: str = "unet"
                         ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(diffusers tensors keyed ``<component>.<layer>.lora_A.weight`` ..., layer -> alpha)."""
    peft_state, alphas = comfyui_to_peft(state)
    return {f"{component}.{key}": tensor for key, tensor in peft_state.items()}, alphas


# --- files --------------------------------------------------------------------------------

def read_lora_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a LoRA file."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, metadata


def save_comfyui_lora(path: str, peft_state: Mapping[str, torch.Tensor], alpha: float | Mapping[str, float],
                      lora_config: dict | None = None) -> None:
    """Write a PEFT state as a ComfyUI LoRA file (atomically); lora_config goes into the metadata."""
    metadata = {"format": "pt"}
    if lora_config is not None:
        metadata["lora_config"] = json.dumps(lora_config, sort_keys=True, default=_plain)
    save_safetensors(peft_to_comfyui(peft_state, alpha), path, metadata)


def _plain(value):
    """JSON stand-in for what LoraConfig.to_dict holds besides plain values (sets of module names, enums)."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)
