"""Side jobs that hang off the training loop: validation, trackers, webhooks, user scripts, disk guard.

A callback implements any of the hooks below; the trainer calls them in order
and never knows what they do. ``build_callbacks`` asks each factory in
``CALLBACK_FACTORIES`` ("module:function", called with the settings) for a
callback, or None when its feature is off.
"""

from __future__ import annotations

import importlib

from simpletuner.config.settings import Settings

CALLBACK_FACTORIES: list[str] = [
    "simpletuner.validation.callback:build_validation_callback",
    "simpletuner.integrations.webhook_callback:webhook_callback",
    "simpletuner.integrations.disk_guard:disk_guard_callback",
    "simpletuner.integrations.user_scripts:post_checkpoint_callback",
    "simpletuner.training.checkpointing:interval_callback",
    "simpletuner.training.text_encoder_training:text_encoder_limit_callback",
    "simpletuner.integrations.publishing:publishing_callback",
]


class Callback:
    def on_train_start(self, trainer) -> None:
        """After setup and resume, before the first step."""

    def on_step_end(self, trainer, step: int, loss: float) -> None:
        """After each optimizer step (step counts optimizer steps from 1)."""

    def on_epoch_end(self, trainer, epoch: int) -> None:
        """After the last step of an epoch."""

    def on_checkpoint(self, trainer, path: str, step: int) -> None:
        """After a checkpoint folder was written (main process only)."""

    def on_train_end(self, trainer, output_dir: str) -> None:
        """After the final model was saved (main process only)."""

    def on_error(self, trainer, error: BaseException) -> None:
        """The run is stopping because of error (re-raised after every callback ran)."""


class CallbackList:
    def __init__(self, callbacks: list[Callback]):
        self.callbacks = callbacks

    def __getattr__(self, hook: str):
        if not hook.startswith("on_"):
            raise AttributeError(hook)

        def call_all(*args, **kwargs):
            for callback in self.callbacks:
                getattr(callback, hook)(*args, **kwargs)

        return call_all


def build_callbacks(settings: Settings) -> CallbackList:
    callbacks = []
    for target in CALLBACK_FACTORIES:
        module_name, function_name = target.split(":")
        callback = getattr(importlib.import_module(module_name), function_name)(settings)
        if callback is not None:
            callbacks.append(callback)
    return CallbackList(callbacks)
