"""Evaluation loss on held-out datasets (``"dataset_type": "eval"`` in multidatabackend.json).

The loss is measured at ``eval_timesteps`` FIXED points spread evenly over the
noise schedule (mid-points of equal slices, so neither the clean nor the pure
noise end is used), with noise drawn from generators seeded by (seed, batch,
timestep). The same weights therefore always give the same number, and a
change between rounds comes from training alone. Plain mean squared error
against the training target is used, whatever the training loss options.

Eval datasets are discovered and their latents and captions cached like
training ones (same cache folders and fingerprint), once, on the main process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from simpletuner.caching.store import TensorStore
from simpletuner.caching.text import TextEmbedCache
from simpletuner.caching.vae import LatentCache
from simpletuner.data.batches import BatchAssembler
from simpletuner.data.types import ImageRecord
from simpletuner.training import losses, noise

EVAL_DATASET_TYPE = "eval"
POOLED_TAG = "eval_loss"


@dataclass
class EvalSet:
    dataset_id: str
    records: list[ImageRecord]
    assembler: BatchAssembler


def _file_safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def eval_specs(data) -> list:
    """The eval datasets scored; only the one eval_dataset_id names when it names an eval dataset."""
    specs = [spec for spec in data.specs.values() if spec.dataset_type == EVAL_DATASET_TYPE]
    chosen = getattr(data.settings, "eval_dataset_id", None)
    if chosen is not None and any(spec.id == chosen for spec in specs):
        return [spec for spec in specs if spec.id == chosen]
    return specs


def open_eval_sets(trainer, progress: bool = True) -> list[EvalSet]:
    """Discover every eval dataset and fill its latent and text caches with the loaded encoders."""
    return [_open_eval_set(trainer, spec, progress) for spec in eval_specs(trainer.data)]


def _open_eval_set(trainer, spec, progress: bool) -> EvalSet:
    from simpletuner.data.discovery import discover_dataset
    from simpletuner.data.storage.factory import make_storage

    settings, data, family = trainer.settings, trainer.data, trainer.family
    storage = make_storage(spec, settings, "data")
    index = discover_dataset(spec, storage, settings, progress=progress)
    store = TensorStore(make_storage(spec, settings, "vae_cache", datasets=list(data.specs.values())),
                        compress=bool(settings.compress_disk_cache))
    latent_cache = LatentCache(store, data.fingerprint, name=f"latents-{_file_safe(spec.id)}")
    report = latent_cache.build(index.records, storage, family.encode_images, int(settings.vae_batch_size or 1),
                                progress=progress)
    failed = {rejection.path for rejection in report.failed}
    records = sorted((r for r in index.records if r.path not in failed), key=lambda r: r.path)
    text_cache: TextEmbedCache = data.text_caches[spec.text_embeds]
    text_cache.build({caption for record in records for caption in record.captions}, family.encode_text,
                     int(settings.write_batch_size or 1), progress=progress)
    # No settings: eval batches use no caption dropout and never encode latents on the fly.
    assembler = BatchAssembler({spec.id: latent_cache}, {spec.id: text_cache}, None)
    return EvalSet(spec.id, records, assembler)


def fixed_fractions(count: int) -> torch.Tensor:
    """``count`` evenly spread points in (0, 1): the mid-points of equal slices."""
    return (torch.arange(count, dtype=torch.float64) + 0.5) / count


def _chunks(records: list[ImageRecord], batch_size: int) -> list[list[ImageRecord]]:
    """Same-bucket batches (latents of one batch must share a shape), in a stable order."""
    by_bucket: dict[str, list[ImageRecord]] = {}
    for record in records:
        by_bucket.setdefault(record.bucket, []).append(record)
    return [group[start:start + batch_size] for _, group in sorted(by_bucket.items())
            for start in range(0, len(group), batch_size)]


class EvalLoss:
    def __init__(self, sets: list[EvalSet], family, loss_step, settings):
        self.sets = sets
        self.family = family
        self.loss_step = loss_step
        self.seed = int(settings.seed or 0)
        self.batch_size = max(1, int(settings.train_batch_size or 1))
        count = int(settings.eval_timesteps or 0)
        if count < 1:
            raise ValueError(f"eval_timesteps={settings.eval_timesteps} must be at least 1")
        self.fractions = fixed_fractions(count)

    @property
    def active(self) -> bool:
        return any(eval_set.records for eval_set in self.sets)

    @torch.no_grad()
    def evaluate(self, device: torch.device, progress: bool = True) -> dict[str, float]:
        """Mean loss per eval dataset id, plus the mean over all of their samples under ``eval_loss``."""
        work = [(eval_set, chunk_index, chunk) for eval_set in self.sets
                for chunk_index, chunk in enumerate(_chunks(eval_set.records, self.batch_size))]
        totals: dict[str, list[float]] = {eval_set.dataset_id: [0.0, 0] for eval_set in self.sets if eval_set.records}
        bar = tqdm(total=len(work) * len(self.fractions), desc="Eval loss", unit="pass", disable=not progress,
                   leave=False)
        try:
            for eval_set, chunk_index, chunk in work:
                generator = torch.Generator().manual_seed(self.seed + chunk_index)
                batch = eval_set.assembler.assemble(chunk, generator).to(device)
                for position, fraction in enumerate(self.fractions.tolist()):
                    loss = self._loss_at(batch, fraction, self._noise_seed(chunk_index, position))
                    totals[eval_set.dataset_id][0] += loss * batch.size
                    totals[eval_set.dataset_id][1] += batch.size
                    bar.update(1)
        finally:
            bar.close()
        results = {dataset_id: total / count for dataset_id, (total, count) in totals.items()}
        if totals:
            results[POOLED_TAG] = sum(t for t, _ in totals.values()) / sum(c for _, c in totals.values())
        return results

    def _noise_seed(self, chunk_index: int, position: int) -> int:
        return (self.seed * 1_000_003 + chunk_index * 7919 + position) % (2**63 - 1)

    def _loss_at(self, batch, fraction: float, seed: int) -> float:
        step = self.loss_step
        latents = batch.latents.float()
        clean_noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents.device)
        size = latents.shape[0]
        if step.flow:
            sigmas = torch.full((size,), fraction, dtype=torch.float32, device=latents.device)
            timesteps = sigmas * step.num_train_timesteps
            noisy = noise.flow_noisy_latents(latents, clean_noise, sigmas)
            target = noise.flow_target(latents, clean_noise)
        else:
            index = min(step.num_train_timesteps - 1, math.floor(fraction * step.num_train_timesteps))
            timesteps = torch.full((size,), index, dtype=torch.long, device=latents.device)
            noisy = noise.add_noise(step.scheduler, latents, clean_noise, timesteps)
            target = losses.training_target(step.prediction_type, step.scheduler, latents, clean_noise, timesteps)
        prediction = self.family.predict(batch, noisy.to(step.weight_dtype), timesteps)
        return float(torch.nn.functional.mse_loss(prediction.float(), target.float()))


def tracker_values(results: dict[str, float], pooled: bool) -> dict[str, float]:
    """What goes to the trackers: ``eval_loss`` always, ``eval_loss/<dataset>`` too unless pooled."""
    values = {POOLED_TAG: results[POOLED_TAG]} if POOLED_TAG in results else {}
    if not pooled:
        values.update({f"{POOLED_TAG}/{dataset_id}": value for dataset_id, value in results.items()
                       if dataset_id != POOLED_TAG})
    return values
