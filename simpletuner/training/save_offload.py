"""offload_during_save: the model's weights leave the accelerator while a checkpoint or the final result is written.

Serialising weights (quantised ones especially) can briefly need extra accelerator memory on top of the
model; with the model parked in CPU memory that spike cannot run out of it. For the length of the save the
trained module, the denoiser, the VAE, the text encoders that are loaded and an accelerator-held EMA copy go
to the CPU; afterwards each goes back to where it was.

Only what sits on the training device moves: for each model the largest sub-modules whose every weight is
there (normally the whole model, one ``.to`` call each way). Weights that an offloading scheme keeps
elsewhere (group offload, block swap, a CPU EMA) are left alone, so that scheme's layout is intact after
the save.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from itertools import chain
from typing import Iterator

import torch

from simpletuner.training.unloading import UnloadedTextEncoder, release_memory

logger = logging.getLogger("simpletuner.save_offload")
CPU = torch.device("cpu")


@contextmanager
def offloaded_during_save(trainer) -> Iterator[None]:
    """With offload_during_save, the run's models wait on the CPU while the body saves; otherwise does nothing."""
    if not trainer.settings.offload_during_save:
        yield
        return
    home = torch.device(trainer.device)
    started = time.monotonic()
    moved = [(module, home) for module in resident_modules(save_modules(trainer), home)]
    for module, _ in moved:
        module.to(CPU)
    ema_devices = _park_ema(getattr(trainer, "ema", None), home)
    release_memory(home)
    logger.info("offload_during_save: %d module(s) on the CPU for the save (%.1fs)", len(moved),
                time.monotonic() - started)
    try:
        yield
    finally:
        for module, device in moved:
            module.to(device)
        _restore_ema(getattr(trainer, "ema", None), ema_devices)


def save_modules(trainer) -> list[torch.nn.Module]:
    """The trained module, the denoiser, the VAE and the loaded text encoders (each once)."""
    components = trainer.components
    candidates = [trainer.accelerator.unwrap_model(trainer.model), components.denoiser, components.vae,
                  *components.text_encoders]
    modules, seen = [], set()
    for module in candidates:
        if module is None or isinstance(module, UnloadedTextEncoder):
            continue
        module = trainer.accelerator.unwrap_model(module)
        if id(module) not in seen:
            seen.add(id(module))
            modules.append(module)
    return modules


def resident_modules(modules: list[torch.nn.Module], home: torch.device) -> list[torch.nn.Module]:
    """The largest sub-modules of ``modules`` whose every parameter and buffer is on ``home``, without overlaps."""
    found: list[torch.nn.Module] = []
    covered: set[int] = set()
    for module in modules:
        for subtree in _uniform_subtrees(module, home):
            if id(subtree) in covered:
                continue
            found.append(subtree)
            covered.update(id(inner) for inner in subtree.modules())
    return [module for module in found if not _inside_another(module, found)]


def _uniform_subtrees(module: torch.nn.Module, home: torch.device) -> list[torch.nn.Module]:
    devices = {tensor.device for tensor in chain(module.parameters(), module.buffers())}
    if not devices:
        return []
    if all(_same_device(device, home) for device in devices):
        return [module]
    return [found for child in module.children() for found in _uniform_subtrees(child, home)]


def _inside_another(module: torch.nn.Module, others: list[torch.nn.Module]) -> bool:
    """True when another listed module contains ``module`` (one model nested in another, e.g. a ControlNet run)."""
    return any(other is not module and any(inner is module for inner in other.modules()) for other in others)


def _same_device(device: torch.device, home: torch.device) -> bool:
    return device.type == home.type and _index(device) == _index(home)


def _index(device: torch.device) -> int:
    """The device's index; an unindexed "cuda" means the current CUDA device."""
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if device.type == "cuda" else 0


def _park_ema(ema, home: torch.device) -> list[torch.device] | None:
    """Move an EMA copy held on the training device to the CPU; returns where each tensor was."""
    shadow = getattr(ema, "shadow", None)
    if not shadow or not any(_same_device(tensor.device, home) for tensor in shadow):
        return None
    devices = [tensor.device for tensor in shadow]
    ema.shadow = [tensor.to(CPU) for tensor in shadow]
    return devices


def _restore_ema(ema, devices: list[torch.device] | None) -> None:
    if devices is not None:
        ema.shadow = [tensor.to(device) for tensor, device in zip(ema.shadow, devices)]
