"""gradient_checkpointing_interval: checkpoint only every Nth block.

Diffusers models checkpoint by calling their ``_gradient_checkpointing_func`` once per block
(per resnet and transformer block in a UNet). Passing a function that checkpoints only every
Nth call of each forward, and runs the others directly, keeps the activations of the blocks in
between: faster than checkpointing everything, lighter than checkpointing nothing.

The trainer enables plain checkpointing while it sets up the trained model, so the interval
is put in place by a callback at the start of training; the setup step checks the settings
early, before any caching.
"""

from __future__ import annotations

import torch

from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.training.callbacks import Callback


class EveryNthBlock:
    """A ``_gradient_checkpointing_func`` that checkpoints calls 0, N, 2N, ... of each forward."""

    def __init__(self, interval: int):
        self.interval = interval
        self.calls = 0

    def restart(self, module, args) -> None:
        """Forward pre-hook on the model: counting starts again with each forward."""
        self.calls = 0

    def __call__(self, block, *args, **kwargs):
        index = self.calls
        self.calls += 1
        if index % self.interval == 0:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)


def check_checkpointing(family, components, settings: Settings, device) -> None:
    """Setup step: refuse an interval or backend the run cannot honour, before any caching starts."""
    backend = settings.gradient_checkpointing_backend or "torch"
    if backend != "torch":  # PyTorch's recomputing checkpoint is the one built
        raise ConfigError("gradient_checkpointing_backend", f"gradient_checkpointing_backend={backend} is not "
                                                            "implemented yet; use torch.")
    interval = settings.gradient_checkpointing_interval
    if interval in (None, 0):
        return
    if int(interval) < 1:
        raise ConfigError("gradient_checkpointing_interval", f"gradient_checkpointing_interval must be 1 or more, "
                                                             f"not {interval}.")
    if not settings.gradient_checkpointing:
        raise ConfigError("gradient_checkpointing_interval", "gradient_checkpointing_interval only thins out gradient "
                                                             "checkpointing; set gradient_checkpointing=true as well, "
                                                             "or remove the interval.")
    if not getattr(components.denoiser, "_supports_gradient_checkpointing", False):
        raise ConfigError("gradient_checkpointing_interval", f"{type(components.denoiser).__name__} has no gradient "
                                                             "checkpointing to thin out; remove "
                                                             "gradient_checkpointing_interval.")


def checkpoint_every_nth_block(module: torch.nn.Module, interval: int) -> EveryNthBlock:
    """Re-enable ``module``'s gradient checkpointing so that only every ``interval``-th block is checkpointed."""
    function = EveryNthBlock(interval)
    module.enable_gradient_checkpointing(gradient_checkpointing_func=function)
    module.register_forward_pre_hook(function.restart)
    return function


class CheckpointInterval(Callback):
    def __init__(self, interval: int):
        self.interval = interval

    def on_train_start(self, trainer) -> None:
        checkpoint_every_nth_block(trainer.trained.module, self.interval)


def interval_callback(settings: Settings) -> CheckpointInterval | None:
    """CALLBACK_FACTORIES entry: active when gradient checkpointing runs with an interval above 1."""
    interval = settings.gradient_checkpointing_interval
    if not settings.gradient_checkpointing or interval in (None, 0, 1):
        return None
    return CheckpointInterval(int(interval))
