"""Which weights a validation round runs with, and putting the model in and out of eval mode."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator

import torch

from simpletuner.training.optimizers import optimizer_eval_mode, optimizer_train_mode
from simpletuner.training.unloading import text_encoders_loaded

TRAINED = "trained"
EMA = "ema"


def _first_parameter(module: torch.nn.Module | None) -> torch.nn.Parameter | None:
    return next(module.parameters(), None) if module is not None else None


@contextmanager
def validation_mode(trainer, resume_training: bool = True) -> Iterator[None]:
    """Eval mode for the model and a schedule-free optimizer, the VAE on the training device.

    ``resume_training`` puts both back into training mode afterwards (off at
    the end of training, where the trainer has already left training mode).
    The family predicts through the unwrapped denoiser meanwhile, so no
    distributed wrapper runs a collective on the main process alone.

    Text encoders that fully_unload_text_encoder unloaded are loaded for the round.

    Pipelines decode latents in the text encoders' dtype without casting, so
    without mixed precision (nothing autocasts) a lower-precision VAE
    (vae_dtype) is upcast to float32 for the round.
    """
    components = trainer.components
    vae = components.vae
    vae_parameter = _first_parameter(vae)
    vae_device = vae_parameter.device if vae_parameter is not None else None
    vae_dtype = vae_parameter.dtype if vae_parameter is not None else None
    round_vae_dtype = torch.float32 if trainer.weight_dtype == torch.float32 else vae_dtype
    wrapped = components.denoiser
    trainer.model.eval()
    optimizer_eval_mode(trainer.optimizer)
    if vae_parameter is not None:
        vae.to(device=trainer.device, dtype=round_vae_dtype)
    if wrapped is trainer.model:
        components.denoiser = trainer.accelerator.unwrap_model(trainer.model)
    try:
        with text_encoders_loaded(trainer, "validation"):
            yield
    finally:
        components.denoiser = wrapped
        if vae_parameter is not None:
            vae.to(device=vae_device, dtype=vae_dtype)
        if resume_training:
            trainer.model.train()
            optimizer_train_mode(trainer.optimizer)


def weight_variants(trainer) -> list[tuple[str, Callable[[], ContextManager]]]:
    """(label, context that swaps those weights in) for each set of weights to render, per ema_validation.

    With lora_type=lycoris every context also scales the network by validation_lycoris_strength.
    """
    mode = trainer.settings.ema_validation or "none"
    ema = trainer.ema
    if ema is None or mode == "none":
        variants = [(TRAINED, nullcontext)]
    elif mode == "ema_only":
        variants = [(EMA, lambda: ema.swapped_in(trainer.trainable))]
    else:
        variants = [(TRAINED, nullcontext), (EMA, lambda: ema.swapped_in(trainer.trainable))]
    strength = lycoris_strength(trainer)
    if strength is None:
        return variants
    return [(label, _nested(swapped, lambda: trainer.trained.strength(strength))) for label, swapped in variants]


def lycoris_strength(trainer) -> float | None:
    """validation_lycoris_strength when a LyCORIS network is trained and the value is not 1, else None."""
    settings = trainer.settings
    strength = settings.validation_lycoris_strength
    if settings.model_type != "lora" or settings.lora_type != "lycoris" or strength is None:
        return None
    if float(strength) == 1.0 or not hasattr(getattr(trainer, "trained", None), "strength"):
        return None
    return float(strength)


def _nested(outer: Callable[[], ContextManager], inner: Callable[[], ContextManager]) -> Callable[[], ContextManager]:
    @contextmanager
    def both() -> Iterator[None]:
        with outer(), inner():
            yield

    return both


def base_weights(trainer) -> Callable[[], ContextManager] | None:
    """A context in which the denoiser computes like the untouched base model, or None when impossible.

    Before the first step the weights are the base ones; a resumed LoRA run
    can switch its adapter off; a resumed full fine-tune has no base weights left.
    """
    if trainer.state.global_step == 0:
        return nullcontext
    module = trainer.accelerator.unwrap_model(trainer.model)
    if (trainer.settings.model_type == "lora" and trainer.settings.lora_type == "standard"
            and hasattr(module, "disable_adapters")):
        return lambda: _adapters_off(module)
    return None


@contextmanager
def _adapters_off(module) -> Iterator[None]:
    module.disable_adapters()
    try:
        yield
    finally:
        module.enable_adapters()
