"""The data facade used by the trainer and by ``simpletuner check`` / ``simpletuner cache``.

``prepare_data`` reads the dataset config, discovers every enabled image
dataset, plans (and, given a loaded model family, builds) the latent and
text-embed caches, and wires the sampler and batch assembler. Nothing here
loads a model: for the "model changed" cache reason it only needs the
family's fingerprint, which is computed from settings.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable

from simpletuner.caching.store import TensorStore
from simpletuner.caching.text import TextCachePlan, TextEmbedCache
from simpletuner.caching.vae import BuildReport, CachePlan, LatentCache, ScanResult
from simpletuner.data.batches import BatchAssembler, BatchStream, PreparedBatch, Prefetcher
from simpletuner.data.sampler import MultiDatasetSampler
from simpletuner.data.types import DatasetIndex, Rejection

logger = logging.getLogger(__name__)

TEXT_DATASET_TYPE = "text_embeds"
REASON_NOT_ENCODED = "could not be encoded into the latent cache"


def _setting(settings, name: str, default):
    value = getattr(settings, name, default)
    return default if value is None else value


def _distributed_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    import torch.distributed as dist

    return not _distributed_active() or dist.get_rank() == 0


@contextmanager
def main_process_first():
    """Rank 0 runs the block first while the other ranks wait; then they run it. Yields ``is_main``."""
    import torch.distributed as dist

    active = _distributed_active()
    is_main = is_main_process()
    if active and not is_main:
        dist.barrier()
    try:
        yield is_main
    finally:
        if active and is_main:
            dist.barrier()


@dataclass
class DatasetState:
    """Everything the pipeline knows about one image dataset."""

    spec: Any
    storage: Any
    index: DatasetIndex
    text_cache_id: str
    latent_cache: LatentCache | None = None
    latent_plan: CachePlan | None = None
    scan: ScanResult | None = None
    build: BuildReport | None = None


@dataclass
class DataPipeline:
    settings: Any
    specs: dict[str, Any]
    datasets: dict[str, DatasetState]
    text_caches: dict[str, TextEmbedCache]
    fingerprint: str | None
    rank: int = 0
    world_size: int = 1
    extra_prompts: list[str] = field(default_factory=list)
    text_plans: dict[str, TextCachePlan] = field(default_factory=dict)
    sampler: MultiDatasetSampler | None = None
    assembler: BatchAssembler | None = None
    conditioning: Any = None  # ConditioningData when image datasets link conditioning datasets
    _stream: BatchStream | None = field(default=None, repr=False)

    # --- captions and plans ---
    def captions_for(self, text_cache_id: str) -> set[str]:
        captions = {caption for state in self.datasets.values() if state.text_cache_id == text_cache_id
                    for record in state.index.records for caption in record.captions}
        if text_cache_id == self.default_text_cache_id:
            captions.update(self.extra_prompts)
        return captions

    @property
    def default_text_cache_id(self) -> str | None:
        return next(iter(self.text_caches), None)

    def refresh_plans(self) -> None:
        for state in self.datasets.values():
            if state.latent_cache is not None:
                state.latent_plan = state.latent_cache.plan(state.index.records)
        self.text_plans = {cache_id: cache.plan(self.captions_for(cache_id))
                           for cache_id, cache in self.text_caches.items()}

    # --- building ---
    def build_caches(self, family, progress: bool = True) -> None:
        """Encode every missing latent and text embed with ``family``'s loaded encoders.

        In multi-process runs rank 0 builds while the others wait, then every
        rank re-plans; records still without latents are dropped from training.
        """
        on_demand = bool(_setting(self.settings, "vae_cache_ondemand", False) or
                         _setting(self.settings, "vae_cache_disable", False))
        with main_process_first() as is_main:
            if is_main:
                if not on_demand:
                    for state in self.datasets.values():
                        self._build_latents(state, family, progress)
                    if self.conditioning is not None:
                        self.conditioning.build_latents(family, self.indexes(),
                                                        int(_setting(self.settings, "vae_batch_size", 4)), progress)
                for cache_id, cache in self.text_caches.items():
                    batch = int(_setting(self.specs.get(cache_id), "write_batch_size",
                                         _setting(self.settings, "write_batch_size", 128)))
                    cache.build(self.captions_for(cache_id), family.encode_text, batch, progress=progress)
        self.refresh_plans()
        if not on_demand:
            self._drop_unencoded()

    def _build_latents(self, state: DatasetState, family, progress: bool) -> None:
        workers = max(2, min(int(_setting(self.settings, "max_workers", 8)), 16))
        state.build = state.latent_cache.build(state.index.records, state.storage, family.encode_images,
                                               int(_setting(self.settings, "vae_batch_size", 4)),
                                               progress=progress, read_workers=workers)
        if state.build.failed and _setting(state.spec, "delete_problematic_images", False):
            for rejection in state.build.failed:
                logger.warning("delete_problematic_images: deleting %s", state.storage.describe(rejection.path))
                state.storage.delete(rejection.path)

    def _drop_unencoded(self) -> None:
        for state in self.datasets.values():
            if state.latent_plan is None or not state.latent_plan.to_encode:
                continue
            failed = {rejection.path: rejection.reason for rejection in (state.build.failed if state.build else [])}
            dropped = {record.path for record, _ in state.latent_plan.to_encode}
            state.index.records = [r for r in state.index.records if r.path not in dropped]
            state.index.rejected.extend(Rejection(path, failed.get(path, REASON_NOT_ENCODED))
                                        for path in sorted(dropped))
            state.latent_plan = CachePlan(cached=state.latent_plan.cached)

    # --- batches ---
    def wire(self, family=None) -> None:
        """(Re)create the sampler and assembler from the current indexes."""
        settings = self.settings
        self.sampler = MultiDatasetSampler({i: s.index for i, s in self.datasets.items()}, self.specs,
                                           batch_size=int(_setting(settings, "train_batch_size", 1)),
                                           seed=int(_setting(settings, "seed", 0)), rank=self.rank,
                                           world_size=self.world_size, settings=settings)
        self.sampler.epoch_start_hook = self._start_epoch
        self._stream = None
        if self.fingerprint is None:
            self.assembler = None
            return
        clear_each_epoch = any(_setting(s.spec, "vae_cache_clear_each_epoch", False) for s in self.datasets.values())
        self.assembler = BatchAssembler(
            {i: s.latent_cache for i, s in self.datasets.items()},
            {i: self.text_caches[s.text_cache_id] for i, s in self.datasets.items()},
            settings, family=family, storages={i: s.storage for i, s in self.datasets.items()},
            specs=self.specs, encode_missing=True if clear_each_epoch else None, conditioning=self.conditioning)

    def stream(self) -> BatchStream:
        """The batch source for training: a ``Prefetcher`` when dataloader_prefetch is set."""
        if self._stream is None:
            if self.assembler is None:
                raise RuntimeError("batches need cache keys: prepare_data was given no model family or fingerprint")
            seed = int(_setting(self.settings, "seed", 0))
            if _setting(self.settings, "dataloader_prefetch", False):
                self._stream = Prefetcher(self.sampler, self.assembler, seed,
                                          int(_setting(self.settings, "dataloader_prefetch_qlen", 10)))
            else:
                self._stream = BatchStream(self.sampler, self.assembler, seed)
        return self._stream

    def next_batch(self) -> PreparedBatch:
        return self.stream().next()

    def _start_epoch(self, epoch: int, resumed: bool) -> dict[str, DatasetIndex]:
        """Sampler hook: for vae_cache_clear_each_epoch datasets, new random crops and (unless resuming)
        removal of the previous epoch's latents; the new ones are encoded as batches need them."""
        from simpletuner.data.discovery import replan_for_epoch

        updates = {}
        for dataset_id, state in self.datasets.items():
            if not _setting(state.spec, "vae_cache_clear_each_epoch", False):
                continue
            if state.latent_cache is not None and not resumed and is_main_process():
                removed = state.latent_cache.clear()
                if self.conditioning is not None:
                    removed += self.conditioning.clear_latents(dataset_id)
                logger.info("epoch %d: removed %d cached latents of %s (vae_cache_clear_each_epoch)",
                            epoch, removed, dataset_id)
            replanned = replan_for_epoch(state.index, state.spec, self.settings, epoch)
            if replanned is not state.index:
                state.index = replanned
                updates[dataset_id] = replanned
        return updates

    def indexes(self) -> dict[str, DatasetIndex]:
        return {dataset_id: state.index for dataset_id, state in self.datasets.items()}

    @property
    def needs_vae_for_batches(self) -> bool:
        """True when batches may encode latents themselves (vae_cache_ondemand/disable or
        vae_cache_clear_each_epoch): the trainer must then keep the VAE loaded."""
        return self.assembler is not None and self.assembler.encode_missing

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def state_dict(self) -> dict:
        return self.stream().state_dict() if self._stream is not None else self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        (self.stream() if self.assembler is not None else self.sampler).load_state_dict(state)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        elif self.assembler is not None:
            self.assembler.flush()

    # --- reporting ---
    def report(self) -> str:
        from simpletuner.data.discovery import summarize

        lines = []
        for dataset_id, state in self.datasets.items():
            lines.extend(summarize(state.index).splitlines())
            lines.extend("  " + line for line in _cache_lines(state))
            pruned = self.sampler.pruned.get(dataset_id) if self.sampler else None
            if pruned:
                lines.append("  buckets dropped (too few for one batch): "
                             + ", ".join(f"{bucket} ({count})" for bucket, count in pruned))
        if self.conditioning is not None:
            lines.extend(self.conditioning.report_lines(self.indexes()))
        for cache_id, plan in self.text_plans.items():
            lines.append(f"Text embeds {cache_id!r} ({self.text_caches[cache_id].store.storage.root}): "
                         f"{plan.summary()}")
        if self.fingerprint is None:
            lines.append("Cache status unknown: no model_family to compute the model fingerprint from.")
        if self.sampler is not None:
            lines.append(self.sampler.describe())
        return "\n".join(lines)


def _cache_lines(state: DatasetState) -> list[str]:
    lines = []
    if state.latent_plan is not None:
        lines.append(f"latents ({state.latent_cache.store.storage.root}): {state.latent_plan.summary()}")
    if state.scan is not None:
        lines.append(f"scan_for_errors: {len(state.scan.problems)} broken entries removed, "
                     f"{state.scan.adopted} records synced to existing entries")
        lines.extend(f"  {path}: {problem}" for path, problem in sorted(state.scan.problems.items())[:20])
    if state.build is not None and state.build.failed:
        lines.append(f"{len(state.build.failed)} images could not be encoded")
    return lines


def resolve_fingerprint(settings, family=None, family_fingerprint: str | None = None) -> str | None:
    """The model fingerprint: given, from the family object, or from the family class and settings."""
    if family_fingerprint:
        return family_fingerprint
    if family is not None:
        return family.fingerprint()
    name = _setting(settings, "model_family", None)
    if not name:
        return None
    from simpletuner.models.registry import get_family

    return get_family(name, _setting(settings, "model_flavour", None))(settings).fingerprint()


def _text_caches(specs: list, settings, fingerprint: str) -> dict[str, TextEmbedCache]:
    """One cache per enabled text_embeds dataset, the default one first."""
    from simpletuner.data.storage.factory import make_storage

    compress = bool(_setting(settings, "compress_disk_cache", False))
    text_specs = sorted((s for s in specs if s.dataset_type == TEXT_DATASET_TYPE and not s.disabled),
                        key=lambda s: not s.default)
    return {spec.id: TextEmbedCache(TensorStore(make_storage(spec, settings, "text_cache"), compress=compress),
                                    fingerprint, name="text")
            for spec in text_specs}


def _open_dataset(spec, specs: list, settings, fingerprint: str | None, progress: bool) -> DatasetState:
    from simpletuner.data.discovery import discover_dataset
    from simpletuner.data.storage.factory import make_storage

    storage = make_storage(spec, settings, "data")
    state = DatasetState(spec, storage, discover_dataset(spec, storage, settings, progress=progress),
                         spec.text_embeds)
    if fingerprint is not None:
        store = TensorStore(make_storage(spec, settings, "vae_cache", datasets=specs),
                            compress=bool(_setting(settings, "compress_disk_cache", False)))
        state.latent_cache = LatentCache(store, fingerprint, name=f"latents-{_file_safe(spec.id)}")
    return state


def _file_safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _scan_for_errors(state: DatasetState, settings, progress: bool) -> None:
    behaviour = _setting(settings, "vae_cache_scan_behaviour", "recreate")
    with main_process_first() as is_main:
        if is_main:
            state.scan = state.latent_cache.scan(state.index.records, behaviour, progress=progress)
    if state.scan is None:  # other ranks: rank 0 removed broken entries; only repeat its sync decisions
        state.scan = state.latent_cache.scan(state.index.records, behaviour, progress=False, verify=False)
    state.index.records = state.scan.records


def validation_prompts(settings) -> list[str]:
    prompts = [_setting(settings, "validation_prompt", None), _setting(settings, "validation_negative_prompt", None)]
    return [prompt for prompt in prompts if isinstance(prompt, str)]


def prepare_data(settings, family=None, rank: int = 0, world_size: int = 1, progress: bool = True, *,
                 family_fingerprint: str | None = None, build: bool | None = None,
                 extra_prompts: Iterable[str] = ()) -> DataPipeline:
    """Discover datasets, plan caches, and wire sampler and assembler.

    ``build`` (default: a family with loaded components was given) encodes
    missing cache entries. ``extra_prompts`` join the default text cache
    besides "" and the validation prompts.
    """
    from simpletuner.data.conditioning import open_conditioning
    from simpletuner.data.dataset_config import load_dataset_config, training_datasets

    specs = load_dataset_config(settings.data_backend_config, settings)
    fingerprint = resolve_fingerprint(settings, family, family_fingerprint)
    text_caches = _text_caches(specs, settings, fingerprint) if fingerprint is not None else {}
    datasets = {}
    for spec in training_datasets(specs):
        state = _open_dataset(spec, specs, settings, fingerprint, progress)
        if state.latent_cache is not None and spec.scan_for_errors:
            _scan_for_errors(state, settings, progress)
        datasets[spec.id] = state
    specs = [s for s in specs if not s.disabled]
    pipeline = DataPipeline(settings, {s.id: s for s in specs}, datasets, text_caches, fingerprint, rank, world_size,
                            extra_prompts=[*validation_prompts(settings), *extra_prompts])
    pipeline.conditioning = open_conditioning(specs, pipeline.indexes(), settings, fingerprint)
    pipeline.refresh_plans()
    if build is None:
        build = family is not None and family.components is not None
    if build:
        pipeline.build_caches(family, progress=progress)
    pipeline.wire(family)
    return pipeline
