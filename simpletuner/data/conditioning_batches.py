"""Adding a batch's conditioning inputs: control pixels or latents, and the loss mask.

``ConditioningSource.apply`` runs inside ``BatchAssembler.assemble`` after the
captions were drawn, with the same per-batch generator, so which
conditioning dataset a sample uses and whether a batch is masked are fixed by
the batch's place in training (a resumed run repeats them).
"""

from __future__ import annotations

import dataclasses
import threading

import torch

from simpletuner.caching.store import CacheEntryError, CacheEntryMissing
from simpletuner.data.conditioning import (ConditioningData, ConditioningSet, load_control_pixels, load_mask)
from simpletuner.data.conditioning_config import CONTROLNET, MASK
from simpletuner.data.types import ImageRecord, TrainingBatch

_FLUSH_EVERY = 256  # on-demand control latents written between manifest saves


def _setting(settings, name: str, default):
    value = getattr(settings, name, default) if settings is not None else default
    return default if value is None else value


class ConditioningSource:
    def __init__(self, data: ConditioningData, settings, family, encode_missing: bool, cache_disabled: bool):
        """``encode_missing``: control latents without a cache entry are encoded with ``family`` at batch time."""
        self.data = data
        self.family = family
        self.encode_missing = encode_missing
        self.cache_disabled = cache_disabled
        self.mask_probability = float(_setting(settings, "masked_loss_probability", 1.0))
        self._lock = threading.Lock()
        self._unflushed: set[str] = set()
        self._written = 0

    # --- public ---
    def apply(self, batch: TrainingBatch, records: list[ImageRecord], generator: torch.Generator) -> TrainingBatch:
        changes = {}
        controls = self._choose(records, CONTROLNET, generator)
        if self.data.control_input is not None and any(c is not None for c in controls):
            self._require_all(records, controls)
            if self.data.control_input == "pixels":
                changes["conditioning_pixels"] = torch.stack(
                    [load_control_pixels(c.record_for(r), c.storage) for r, c in zip(records, controls)])
            else:
                changes["conditioning_latents"] = torch.stack(self._control_latents(records, controls))
        masks = self._choose(records, MASK, generator)
        if any(m is not None for m in masks):
            masked = float(torch.rand(1, generator=generator)) < self.mask_probability
            if masked:
                changes["loss_mask"] = torch.stack([self._mask(r, m) for r, m in zip(records, masks)])
        return dataclasses.replace(batch, **changes) if changes else batch

    def flush(self) -> None:
        with self._lock:
            names, self._unflushed, self._written = self._unflushed, set(), 0
        for conditioning in self.data.cached_sets():
            if conditioning.id in names:
                conditioning.latent_cache.flush()

    # --- choosing ---
    def _choose(self, records: list[ImageRecord], kind: str,
                generator: torch.Generator) -> list[ConditioningSet | None]:
        """Per record: its dataset's only set of ``kind``, one drawn at random among several, or None."""
        chosen = []
        for record in records:
            candidates = [c for c in self.data.links.get(record.dataset_id, []) if c.kind == kind]
            if len(candidates) > 1:
                chosen.append(candidates[int(torch.randint(len(candidates), (1,), generator=generator))])
            else:
                chosen.append(candidates[0] if candidates else None)
        return chosen

    @staticmethod
    def _require_all(records: list[ImageRecord], controls: list) -> None:
        for record, control in zip(records, controls):
            if control is None:
                raise CacheEntryError(record.sample_id, "has no control image, but other samples of its batch do",
                                      fix="Link a ControlNet conditioning dataset to every training dataset.")

    @staticmethod
    def _mask(record: ImageRecord, conditioning: ConditioningSet | None) -> torch.Tensor:
        if conditioning is None:  # a dataset without masks, batched with masked ones: learn everywhere
            width, height = record.target_size
            return torch.ones(1, height, width)
        return load_mask(conditioning.record_for(record), conditioning.storage)

    # --- control latents ---
    def _control_latents(self, records: list[ImageRecord], controls: list[ConditioningSet]) -> list[torch.Tensor]:
        found: list[torch.Tensor | None] = [None] * len(records)
        pending = []
        for index, (record, control) in enumerate(zip(records, controls)):
            paired = control.record_for(record)
            if not self.cache_disabled:
                try:
                    found[index] = control.latent_cache.get(paired)
                    continue
                except CacheEntryMissing as error:
                    if not self.encode_missing:
                        raise CacheEntryError(error.location, f"no cached control latents for {record.sample_id}",
                                              fix="Run `simpletuner cache` first, or train with "
                                                  "vae_cache_ondemand.") from None
            pending.append((index, paired, control))
        if pending:
            for (index, _, _), latent in zip(pending, self._encode(pending)):
                found[index] = latent
        return found

    def _encode(self, pending: list[tuple[int, ImageRecord, ConditioningSet]]) -> list[torch.Tensor]:
        if self.family is None:
            raise CacheEntryError(pending[0][1].sample_id, "has no cached control latents and no VAE is available "
                                  "to encode them", fix="Run `simpletuner cache` first.")
        pixels = torch.stack([load_control_pixels(paired, control.storage) for _, paired, control in pending])
        with torch.no_grad():
            latents = list(self.family.encode_images(pixels).detach().to("cpu"))
        if not self.cache_disabled:
            for (_, paired, control), latent in zip(pending, latents):
                control.latent_cache.put(paired, latent)
            with self._lock:
                self._unflushed |= {control.id for _, _, control in pending}
                self._written += len(pending)
                due = self._written >= _FLUSH_EVERY
            if due:
                self.flush()
        return latents
