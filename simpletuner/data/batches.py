"""Turning the sampler's records into a ``TrainingBatch``.

``BatchAssembler`` reads cached latents and text embeds, picks one caption
per record and applies caption dropout. ``BatchStream`` pairs it with the
sampler (one batch per call); ``Prefetcher`` does the same on a background
thread, keeping ``dataloader_prefetch_qlen`` batches ready (the sampler, its
epoch hook and the caches are then used from that thread only). Both derive each
batch's random generator from (seed, rank, epoch, step), so a resumed run, or
one with prefetch switched on or off, makes the same caption choices.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from simpletuner.caching.store import CacheEntryError, CacheEntryMissing
from simpletuner.caching.text import EMPTY_CAPTION, TextEmbedCache
from simpletuner.caching.vae import LatentCache, default_pixel_loader
from simpletuner.data.sampler import MultiDatasetSampler, derive_seed
from simpletuner.data.types import ImageRecord, TrainingBatch

logger = logging.getLogger(__name__)

_FLUSH_EVERY = 256  # on-demand latents written between manifest saves


def _setting(settings, name: str, default):
    value = getattr(settings, name, default) if settings is not None else default
    return default if value is None else value


def stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack on a new batch dim, zero-padding every dim to the largest size (e.g. varying token counts)."""
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) == 1:
        return torch.stack(tensors)
    if len({t.ndim for t in tensors}) != 1:
        raise ValueError(f"cannot stack tensors of different ranks: {sorted(shapes)}")
    largest = [max(sizes) for sizes in zip(*shapes)]
    out = tensors[0].new_zeros((len(tensors), *largest))
    for index, tensor in enumerate(tensors):
        out[(index, *(slice(0, size) for size in tensor.shape))] = tensor
    return out


class BatchAssembler:
    def __init__(self, latent_caches: Mapping[str, LatentCache],
                 text_cache: TextEmbedCache | Mapping[str, TextEmbedCache], settings, family=None,
                 storages: Mapping[str, Any] | None = None, *, specs: Mapping[str, Any] | None = None,
                 encode_missing: bool | None = None, load_fn=None, conditioning=None):
        """``text_cache`` is one cache for every dataset, or a mapping dataset id -> cache.

        ``encode_missing`` (default: vae_cache_ondemand or vae_cache_disable)
        lets latents without a cache entry be encoded at batch time with
        ``family.encode_images``; ``vae_cache_disable`` also skips reading and
        writing the latent cache. ``conditioning`` (a ``ConditioningData``) adds
        control inputs and loss masks from conditioning datasets.
        """
        self.latent_caches = dict(latent_caches)
        self.text_cache = text_cache
        self.family = family
        self.storages = dict(storages or {})
        self.load_fn = load_fn or default_pixel_loader
        self.cache_disabled = bool(_setting(settings, "vae_cache_disable", False))
        if encode_missing is None:
            encode_missing = self.cache_disabled or bool(_setting(settings, "vae_cache_ondemand", False))
        self.encode_missing = encode_missing
        self.conditioning = (conditioning.source(settings, family, encode_missing, self.cache_disabled)
                             if conditioning is not None else None)
        global_dropout = float(_setting(settings, "caption_dropout_probability", 0.0))
        self.dropout = {dataset_id: float(_setting(spec, "caption_dropout_probability", global_dropout))
                        for dataset_id, spec in (specs or {}).items()}
        self.default_dropout = global_dropout
        self._lock = threading.Lock()
        self._unflushed: set[str] = set()
        self._written_since_flush = 0

    # --- public ---
    def assemble(self, records: list[ImageRecord], generator: torch.Generator) -> TrainingBatch:
        if not records:
            raise ValueError("cannot assemble an empty batch")
        captions = [self.pick_caption(record, generator) for record in records]
        latents = self._latents(records)
        text = self._text(records, captions)
        batch = TrainingBatch(
            latents=torch.stack(latents),
            text=text,
            original_sizes=[(r.original_size[1], r.original_size[0]) for r in records],
            crop_coords=[tuple(r.crop_offset) for r in records],
            target_sizes=[(r.target_size[1], r.target_size[0]) for r in records],
            sample_ids=[r.sample_id for r in records],
            captions=captions,
        )
        return self.conditioning.apply(batch, records, generator) if self.conditioning is not None else batch

    def pick_caption(self, record: ImageRecord, generator: torch.Generator) -> str:
        """One of the record's captions at random, or "" with the dataset's caption dropout probability."""
        choice = int(torch.randint(max(1, len(record.captions)), (1,), generator=generator))
        dropped = float(torch.rand(1, generator=generator)) < self.dropout.get(record.dataset_id,
                                                                             self.default_dropout)
        if dropped or not record.captions:
            return EMPTY_CAPTION
        return record.captions[choice]

    def flush(self) -> None:
        """Save the manifests of caches that received on-demand latents."""
        with self._lock:
            names, self._unflushed = self._unflushed, set()
            self._written_since_flush = 0
        for dataset_id in names:
            self.latent_caches[dataset_id].flush()
        if self.conditioning is not None:
            self.conditioning.flush()

    # --- latents ---
    def _latents(self, records: list[ImageRecord]) -> list[torch.Tensor]:
        found: list[torch.Tensor | None] = [None] * len(records)
        if not self.cache_disabled:
            for index, record in enumerate(records):
                try:
                    found[index] = self._cache_of(record).get(record)
                except CacheEntryMissing as error:
                    if not self.encode_missing:
                        raise CacheEntryError(error.location, f"no cached latents for {record.sample_id}",
                                              fix="Run `simpletuner cache` first, or train with "
                                                  "vae_cache_ondemand.") from None
        missing = [index for index, latent in enumerate(found) if latent is None]
        if missing:
            encoded = self._encode([records[i] for i in missing])
            for index, latent in zip(missing, encoded):
                found[index] = latent
        return found

    def _cache_of(self, record: ImageRecord) -> LatentCache:
        cache = self.latent_caches.get(record.dataset_id)
        if cache is None:
            raise KeyError(f"no latent cache for dataset {record.dataset_id!r}")
        return cache

    def _encode(self, records: list[ImageRecord]) -> list[torch.Tensor]:
        if self.family is None or not all(r.dataset_id in self.storages for r in records):
            raise CacheEntryError(records[0].sample_id, "has no cached latents and no VAE is available to encode "
                                  "them", fix="Run `simpletuner cache` first, or train with vae_cache_ondemand.")
        pixels = torch.stack([self.load_fn(r, self.storages[r.dataset_id]) for r in records])
        with torch.no_grad():
            latents = self.family.encode_images(pixels).detach().to("cpu")
        if not self.cache_disabled:
            for record, latent in zip(records, latents):
                self._cache_of(record).put(record, latent)
            self._note_written({r.dataset_id for r in records}, len(records))
        return list(latents)

    def _note_written(self, dataset_ids: set[str], count: int) -> None:
        with self._lock:
            self._unflushed |= dataset_ids
            self._written_since_flush += count
            due = self._written_since_flush >= _FLUSH_EVERY
        if due:
            self.flush()

    # --- text ---
    def _text_cache_of(self, dataset_id: str) -> TextEmbedCache:
        if isinstance(self.text_cache, TextEmbedCache):
            return self.text_cache
        return self.text_cache[dataset_id]

    def _text(self, records: list[ImageRecord], captions: list[str]) -> dict[str, torch.Tensor]:
        rows = []
        for record, caption in zip(records, captions):
            try:
                rows.append(self._text_cache_of(record.dataset_id).get(caption))
            except CacheEntryMissing as error:
                raise CacheEntryError(error.location, f"no text embeds for caption {caption[:80]!r} of "
                                      f"{record.sample_id}", fix="Run `simpletuner cache` to encode it.") from None
        names = list(rows[0])
        if any(set(row) != set(names) for row in rows):
            raise CacheEntryError(records[0].sample_id, "text cache entries of one batch hold different tensors",
                                  fix="Clear the text cache so it is rebuilt with one model.")
        return {name: stack_padded([row[name] for row in rows]) for name in names}


def batch_generator(seed: int, rank: int, epoch: int, step: int) -> torch.Generator:
    """The random generator for one batch's caption choices, fixed by its place in training."""
    return torch.Generator().manual_seed(derive_seed(seed, "captions", rank, epoch, step) % (2**63))


@dataclass
class PreparedBatch:
    records: list[ImageRecord]
    batch: TrainingBatch
    epoch: int
    epoch_step: int  # 1 for the first batch of an epoch
    epoch_finished: bool  # this was the epoch's last batch
    sampler_state: dict  # the sampler's state right after drawing this batch (resume point)


class BatchStream:
    """Draws records from the sampler and assembles them, one batch per ``next()``."""

    def __init__(self, sampler: MultiDatasetSampler, assembler: BatchAssembler, seed: int):
        self.sampler, self.assembler, self.seed = sampler, assembler, int(seed or 0)
        self._resume_state = sampler.state_dict()

    def _draw(self) -> PreparedBatch:
        records = self.sampler.next_batch()
        epoch, step = self.sampler.epoch, self.sampler.epoch_step
        generator = batch_generator(self.seed, self.sampler.rank, epoch, step)
        batch = self.assembler.assemble(records, generator)
        return PreparedBatch(records, batch, epoch, step, self.sampler.epoch_finished, self.sampler.state_dict())

    def next(self) -> PreparedBatch:
        prepared = self._draw()
        self._resume_state = prepared.sampler_state
        return prepared

    def state_dict(self) -> dict:
        """The sampler state after the last batch handed to the caller (what a checkpoint should save)."""
        return dict(self._resume_state)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._resume_state = self.sampler.state_dict()

    def close(self) -> None:
        self.assembler.flush()


class Prefetcher(BatchStream):
    """A ``BatchStream`` that assembles up to ``queue_length`` batches ahead on a background thread."""

    def __init__(self, sampler: MultiDatasetSampler, assembler: BatchAssembler, seed: int, queue_length: int = 10):
        super().__init__(sampler, assembler, seed)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_length))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item: Any = self._draw()
            except Exception as error:  # handed to the consumer thread, which re-raises it
                item = error
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return

    def next(self) -> PreparedBatch:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        self._resume_state = item.sampler_state
        return item

    def load_state_dict(self, state: dict) -> None:
        if self._thread is not None:
            raise RuntimeError("load the sampler state before the first batch is drawn")
        super().load_state_dict(state)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        super().close()
