"""fully_unload_text_encoder: the text encoders leave memory once every caption's embedding is cached.

Training reads text embeddings from the cache only, so after caching nothing needs the encoders until
something encodes text again: a validation round (its pipelines encode the prompts, eval datasets encode
their captions) or the final save of a full fine-tune (its pipeline folder holds the text encoders).

Unloading drops every reference the run holds (the components' slots, which get an ``UnloadedTextEncoder``
placeholder, and the VAE's offload hook), collects garbage and empties the accelerator's cache, so the
weights' memory really is returned. ``loaded()`` brings them back for such a use: loaded again through
the family's own loader (``ModelFamily.load_text_encoders``), prepared the way setup prepared them
(frozen, quantised per text_encoder_N_precision, offload hooks) and unloaded again when the use ends.
A family that cannot load its encoders on their own (a single-file checkpoint) stops with the reason.
"""

from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from typing import Iterator

import torch

from simpletuner.config.errors import ConfigError
from simpletuner.training.quantization import NO_CHANGE, quantize_module, stored_bytes, text_encoder_option

logger = logging.getLogger("simpletuner.unloading")


class UnloadedTextEncoder:
    """Holds an unloaded encoder's slot in ``components.text_encoders``; any use says why it is missing."""

    def __init__(self, slot: int):
        self.slot = slot

    def __getattr__(self, name: str):
        raise AttributeError(f"text encoder {self.slot + 1} was unloaded after caching (fully_unload_text_encoder); "
                           "load it back with simpletuner.training.unloading.text_encoders_loaded(trainer) around "
                           "the code that needs it")

    def __call__(self, *args, **kwargs):
        return self.__getattr__("__call__")

    def __repr__(self) -> str:
        return f"UnloadedTextEncoder(slot={self.slot})"


class TextEncoderUnloader:
    """Unloads a run's text encoders and loads them back while something needs them."""

    def __init__(self, family, components, settings, device: torch.device, weight_dtype: torch.dtype):
        self.family = family
        self.components = components
        self.settings = settings
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        self.resident = True

    def unload(self) -> None:
        encoders = [encoder for encoder in self.components.text_encoders
                    if not isinstance(encoder, UnloadedTextEncoder)]
        if not encoders:
            self.resident = False
            return
        size = sum(stored_bytes(encoder) for encoder in encoders)
        _forget_in_vae_hook(self.components.vae)
        self.components.text_encoders[:] = [UnloadedTextEncoder(slot) for slot in range(len(encoders))]
        del encoders
        release_memory(self.device)
        self.resident = False
        logger.info("fully_unload_text_encoder: unloaded the text encoders (%.1f MB)", size / 2**20)

    @contextmanager
    def loaded(self, purpose: str) -> Iterator[None]:
        """The encoders in memory for the body (loaded again when unloaded, and unloaded again afterwards)."""
        if self.resident:
            yield
            return
        self._reload(purpose)
        try:
            yield
        finally:
            self.unload()

    def _reload(self, purpose: str) -> None:
        try:
            encoders = self.family.load_text_encoders(self.weight_dtype)
        except NotImplementedError as error:
            raise ConfigError("fully_unload_text_encoder",
                              f"fully_unload_text_encoder unloaded the text encoders, and {purpose} needs them "
                              f"again, but {error}. Turn fully_unload_text_encoder off, or turn off what needs "
                              "them (validation_disable=true; eval datasets).") from None
        prepare_reloaded(encoders, self.components, self.settings, self.device)
        self.resident = True
        logger.info("fully_unload_text_encoder: loaded the text encoders again for %s", purpose)


def prepare_reloaded(encoders: list[torch.nn.Module], components, settings, device: torch.device) -> None:
    """Freeze, quantise and place reloaded encoders as the setup steps did, then put them in their slots."""
    for slot, encoder in enumerate(encoders):
        encoder.requires_grad_(False)
        encoder.eval()
        level = getattr(settings, text_encoder_option(slot)) or NO_CHANGE
        if level != NO_CHANGE and settings.quantize_via != "pipeline":  # "pipeline": quantised while loading
            quantize_module(encoder, level, settings.quantize_via, device)
        encoder.to(device)
    components.text_encoders[:] = encoders
    if settings.enable_model_cpu_offload or settings.offload_during_startup:
        from simpletuner.training.offload import offload_text_encoders

        offload_text_encoders(components, device, after_each_use=bool(settings.enable_model_cpu_offload))


def _forget_in_vae_hook(vae) -> None:
    """Empty the encoder list of the VAE's offload hook (offload_during_startup / enable_model_cpu_offload)."""
    from simpletuner.training.offload import EvictFirst

    hook = getattr(vae, "_hf_hook", None)
    for part in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        if isinstance(part, EvictFirst):
            part.others = []


def release_memory(device: torch.device) -> None:
    """Collect unreachable modules now and hand the accelerator's freed blocks back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def unload_after_caching(trainer) -> TextEncoderUnloader | None:
    """The setup_data hook: with fully_unload_text_encoder, unload the encoders now the caches are built."""
    if not trainer.settings.fully_unload_text_encoder:
        return None
    unloader = TextEncoderUnloader(trainer.family, trainer.components, trainer.settings, trainer.device,
                                   trainer.weight_dtype)
    unloader.unload()
    return unloader


@contextmanager
def text_encoders_loaded(trainer, purpose: str) -> Iterator[None]:
    """The run's text encoders in memory for the body; does nothing when they were never unloaded."""
    unloader = getattr(trainer, "text_encoder_unloader", None)
    if unloader is None:
        yield
        return
    with unloader.loaded(purpose):
        yield


@contextmanager
def text_encoders_for_saving(trainer) -> Iterator[None]:
    """The final save's context: a full model's pipeline folder holds the text encoders, so they are loaded."""
    from simpletuner.training.trainable import FullModel

    if not isinstance(trainer.trained, FullModel):
        yield
        return
    with text_encoders_loaded(trainer, "saving the full model's pipeline"):
        yield


def text_encoders_needed_later(settings, data) -> bool:
    """Whether anything after caching may encode text: validation renders, eval datasets or a full model's save."""
    from simpletuner.validation.eval_loss import eval_specs

    evaluates = not settings.eval_loss_disable and bool(eval_specs(data))
    return not settings.validation_disable or evaluates or settings.model_type == "full"
