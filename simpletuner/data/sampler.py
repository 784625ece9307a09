"""Which records form each training step, across several datasets.

Every step is one *global batch* of ``batch_size * world_size`` records from a
single aspect bucket of a single dataset; rank ``r`` takes slice ``r`` of it,
so ranks never overlap within a step and all ranks agree on the bucket.

An epoch is planned up front from ``(seed, epoch)``:

* each dataset counted toward the epoch contributes all of its samples,
  ``repeats + 1`` times (``repeats=0`` means every image once), cut into
  global batches per bucket and shuffled (a bucket's leftover that cannot fill
  a global batch is dropped for that epoch);
* the order of datasets is drawn step by step with weights ``probability``
  (``data_backend_sampling=uniform``) or ``probability * samples per epoch``
  (``auto-weighting``), among datasets that still have batches left;
* datasets with ``ignore_epochs`` are drawn with their weight as well but
  never run out: they cycle through their own reshuffled stream and do not
  decide when the epoch ends.

Because the plan is a pure function of the seed, the epoch and the streams'
positions at the epoch's start, ``state_dict`` only needs those and the step
within the epoch to resume with exactly the next batch.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import logging
import random
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Callable

from simpletuner.data.types import DatasetIndex, ImageRecord

logger = logging.getLogger(__name__)

SAMPLING_MODES = ("uniform", "auto-weighting")
_STATE_VERSION = 1


def derive_seed(*parts: Any) -> int:
    """A stable 64-bit seed from any printable parts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode("utf-8")).digest()[:8], "little")


def _setting(settings, name: str, default):
    value = getattr(settings, name, default) if settings is not None else default
    return default if value is None else value


def _spec_value(spec, name: str, default):
    value = getattr(spec, name, default)
    return default if value is None else value


@dataclass(eq=False)
class _Source:
    """One dataset as the sampler sees it, after pruning and repeats."""

    dataset_id: str
    buckets: dict[str, list[ImageRecord]]
    repeats: int
    weight: float
    counts_toward_epoch: bool
    start_epoch: int = 1
    end_epoch: int | None = None

    @property
    def samples_per_epoch(self) -> int:
        return sum(len(records) for records in self.buckets.values()) * (self.repeats + 1)

    def active_in(self, epoch: int) -> bool:
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch <= self.end_epoch)


def _global_batches(source: _Source, global_size: int, rng: random.Random) -> list[list[ImageRecord]]:
    """All global batches of one pass over ``source`` (repeats included), in shuffled order."""
    batches = []
    for bucket in sorted(source.buckets):
        records = source.buckets[bucket]
        samples: list[ImageRecord] = []
        for _ in range(source.repeats + 1):
            copy = list(records)
            rng.shuffle(copy)
            samples.extend(copy)
        if len(samples) < global_size:  # only with disable_bucket_pruning: cycle to fill one batch
            samples = [samples[i % len(samples)] for i in range(global_size)]
        elif source.repeats:
            _spread_duplicates(samples, global_size)
        usable = len(samples) - len(samples) % global_size
        batches.extend(samples[start:start + global_size] for start in range(0, usable, global_size))
    rng.shuffle(batches)
    return batches


def _spread_duplicates(samples: list[ImageRecord], global_size: int) -> None:
    """Swap samples so no global batch holds one image twice (possible where repeated copies meet)."""
    for start in range(0, len(samples) - len(samples) % global_size, global_size):
        seen: set[str] = set()
        for position in range(start, start + global_size):
            if samples[position].path in seen:
                for later in range(start + global_size, len(samples)):
                    if samples[later].path not in seen:
                        samples[position], samples[later] = samples[later], samples[position]
                        break
            seen.add(samples[position].path)


class _Stream:
    """Endless batches of an ``ignore_epochs`` dataset: pass after pass, each freshly shuffled."""

    def __init__(self, source: _Source, global_size: int, seed: int):
        self.source, self.global_size, self.seed = source, global_size, seed
        self.cycle, self.position = 0, 0
        self._batches: list[list[ImageRecord]] | None = None

    def state(self) -> list[int]:
        return [self.cycle, self.position]

    def restore(self, state: list[int]) -> None:
        self.cycle, self.position = int(state[0]), int(state[1])
        self._batches = None

    def next(self) -> list[ImageRecord]:
        if self._batches is None:
            rng = random.Random(derive_seed(self.seed, "stream", self.source.dataset_id, self.cycle))
            self._batches = _global_batches(self.source, self.global_size, rng)
        batch = self._batches[self.position]
        self.position += 1
        if self.position >= len(self._batches):
            self.cycle, self.position, self._batches = self.cycle + 1, 0, None
        return batch


class MultiDatasetSampler:
    def __init__(self, indexes: dict[str, DatasetIndex], specs: dict[str, Any], batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, settings=None):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid sampler layout: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed = int(seed or 0)
        self.global_size = batch_size * world_size
        self.mode = _setting(settings, "data_backend_sampling", "auto-weighting")
        if self.mode not in SAMPLING_MODES:
            raise ValueError(f"data_backend_sampling={self.mode!r} is not one of {', '.join(SAMPLING_MODES)}")
        self.pruned: dict[str, list[tuple[str, int]]] = {}  # dataset id -> [(bucket, images)] dropped
        self.repeats_raised: dict[str, int] = {}  # dataset id -> repeats set by oversubscription
        self._specs, self._settings = dict(specs), settings
        self.sources = self._make_sources(indexes)
        self._streams = {s.dataset_id: _Stream(s, self.global_size, self.seed)
                         for s in self.sources if not s.counts_toward_epoch}
        # Called as hook(epoch, resumed) before an epoch after the first is planned; returns replacement
        # indexes (dataset id -> DatasetIndex), e.g. new random crops, or an empty dict.
        self.epoch_start_hook: Callable[[int, bool], dict[str, DatasetIndex]] | None = None
        self._epoch = 1
        self._position = 0
        self._streams_at_start: dict[str, list[int]] = {}
        self._schedule: list[tuple[str, list[ImageRecord]]] | None = None

    # --- setup ---
    def _make_sources(self, indexes: dict[str, DatasetIndex]) -> list[_Source]:
        sources, shortfalls = [], []
        for dataset_id in sorted(indexes):
            source = self._make_source(dataset_id, indexes[dataset_id], shortfalls)
            if source is not None:
                sources.append(source)
        if not sources:
            raise ValueError(self._no_batches_message(shortfalls))
        if not any(s.counts_toward_epoch for s in sources):
            logger.warning("every dataset sets ignore_epochs; they all count toward the epoch instead")
            for source in sources:
                source.counts_toward_epoch = True
        return sources

    def _make_source(self, dataset_id: str, index: DatasetIndex, shortfalls: list) -> _Source | None:
        spec, settings = self._specs[dataset_id], self._settings
        probability = float(_spec_value(spec, "probability", 1.0))
        if _spec_value(spec, "disabled", False) or probability <= 0:
            logger.info("dataset %s is not sampled (disabled or probability 0)", dataset_id)
            return None
        buckets = _regularisation_marked(index.buckets(), spec)
        repeats = int(_spec_value(spec, "repeats", 0))
        if _setting(settings, "allow_dataset_oversubscription", False) and buckets and not _repeats_explicit(spec):
            accumulation = int(_setting(settings, "gradient_accumulation_steps", 1))
            repeats = self._oversubscribed_repeats(dataset_id, buckets, repeats, accumulation)
        kept = self._prune(dataset_id, buckets, repeats, bool(_setting(settings, "disable_bucket_pruning", False)))
        if not kept:
            shortfalls.append((dataset_id, buckets, repeats))
            return None
        samples = sum(len(r) for r in kept.values()) * (repeats + 1)
        weight = probability * samples if self.mode == "auto-weighting" else probability
        return _Source(dataset_id, kept, repeats, weight,
                       counts_toward_epoch=not _spec_value(spec, "ignore_epochs", False),
                       start_epoch=int(_spec_value(spec, "start_epoch", 1)),
                       end_epoch=_spec_value(spec, "end_epoch", None))

    def replace_indexes(self, updates: dict[str, DatasetIndex]) -> None:
        """Use new indexes (e.g. re-planned random crops) from the next epoch plan on."""
        for position, old in enumerate(self.sources):
            if old.dataset_id not in updates:
                continue
            new = self._make_source(old.dataset_id, updates[old.dataset_id], [])
            if new is None:
                logger.warning("dataset %s: its re-planned buckets cannot fill a batch; keeping the previous plan",
                               old.dataset_id)
                continue
            new.counts_toward_epoch = old.counts_toward_epoch
            self.sources[position] = new
            if old.dataset_id in self._streams:
                self._streams[old.dataset_id].source = new

    def _oversubscribed_repeats(self, dataset_id: str, buckets: dict[str, list], repeats: int,
                                accumulation: int) -> int:
        needed = self.global_size * max(1, accumulation)
        largest = max(len(records) for records in buckets.values())
        wanted = -(-needed // largest) - 1
        if wanted > repeats:
            repeats = wanted
            self.repeats_raised[dataset_id] = repeats
            logger.warning("allow_dataset_oversubscription: dataset %s has at most %d images per bucket but one "
                           "step needs %d (batch %d x %d GPUs x %d accumulation); using repeats=%d",
                           dataset_id, largest, needed, self.batch_size, self.world_size, accumulation, repeats)
        return repeats

    def _prune(self, dataset_id: str, buckets: dict[str, list[ImageRecord]], repeats: int,
               keep_small: bool) -> dict[str, list[ImageRecord]]:
        kept, dropped = {}, []
        for bucket, records in sorted(buckets.items()):
            if keep_small or len(records) * (repeats + 1) >= self.global_size:
                kept[bucket] = records
            else:
                dropped.append((bucket, len(records)))
        if dropped:
            self.pruned[dataset_id] = dropped
            listing = ", ".join(f"{bucket} ({count} images)" for bucket, count in dropped)
            logger.warning("dataset %s: dropping buckets with fewer than %d samples (batch %d x %d GPUs) after "
                           "repeats: %s. Set disable_bucket_pruning to keep them.", dataset_id, self.global_size,
                           self.batch_size, self.world_size, listing)
        return kept

    def _no_batches_message(self, shortfalls) -> str:
        lines = [f"No dataset can fill a single batch: each step needs {self.global_size} samples from one aspect "
                 f"bucket (train_batch_size={self.batch_size} x {self.world_size} processes)."]
        for dataset_id, buckets, repeats in shortfalls:
            for bucket, records in sorted(buckets.items()):
                minimum = max(0, -(-self.global_size // len(records)) - 1)
                lines.append(f"  dataset {dataset_id!r} bucket {bucket}: {len(records)} images, repeats={repeats}; "
                             f"needs repeats >= {minimum}")
        lines.append("Fix: raise 'repeats' in the dataset config, lower train_batch_size, set "
                     "disable_bucket_pruning or allow_dataset_oversubscription, or add images.")
        return "\n".join(lines)

    # --- epoch planning ---
    def _plan_epoch(self) -> None:
        """Build the current epoch's schedule from the seed and the streams' current positions."""
        self._streams_at_start = {dataset_id: stream.state() for dataset_id, stream in self._streams.items()}
        active = [s for s in self.sources if s.active_in(self._epoch)]
        remaining = {s.dataset_id: _global_batches(s, self.global_size,
                                                   random.Random(derive_seed(self.seed, "epoch", self._epoch,
                                                                             s.dataset_id)))
                     for s in active if s.counts_toward_epoch}
        for batches in remaining.values():
            batches.reverse()  # pop() from the end walks them in planned order
        rng = random.Random(derive_seed(self.seed, "mix", self._epoch))
        schedule: list[tuple[str, list[ImageRecord]]] = []
        candidates: list[_Source] = []
        cumulative: list[float] = []
        while any(remaining.values()):
            current = [s for s in active if not s.counts_toward_epoch or remaining.get(s.dataset_id)]
            if current != candidates:
                candidates, cumulative = current, list(accumulate(s.weight for s in current))
            chosen = candidates[bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
                                if len(candidates) > 1 else 0]
            if chosen.counts_toward_epoch:
                schedule.append((chosen.dataset_id, remaining[chosen.dataset_id].pop()))
            else:
                schedule.append((chosen.dataset_id, self._streams[chosen.dataset_id].next()))
        if not schedule:
            raise ValueError(f"no dataset is active in epoch {self._epoch}: check start_epoch/end_epoch "
                             "in the dataset config")
        self._schedule = schedule

    def _ensure_schedule(self) -> list[tuple[str, list[ImageRecord]]]:
        if self._schedule is None:
            self._plan_epoch()
        return self._schedule

    # --- iteration ---
    def next_batch(self) -> list[ImageRecord]:
        """This rank's records for the next step; moves to the next epoch when this one is used up."""
        schedule = self._ensure_schedule()
        if self._position >= len(schedule):
            self._epoch += 1
            self._position = 0
            self._run_epoch_hook(resumed=False)
            self._plan_epoch()
            schedule = self._schedule
        _, global_batch = schedule[self._position]
        self._position += 1
        start = self.rank * self.batch_size
        return global_batch[start:start + self.batch_size]

    def __iter__(self):
        while True:
            yield self.next_batch()

    @property
    def epoch(self) -> int:
        """The epoch (from 1) of the batch last returned by ``next_batch``."""
        return self._epoch

    @property
    def epoch_step(self) -> int:
        """How many batches of the current epoch have been returned."""
        return self._position

    @property
    def steps_per_epoch(self) -> int:
        """Batches per rank in the current epoch (it can vary between epochs only through ignore_epochs draws)."""
        return len(self._ensure_schedule())

    @property
    def epoch_finished(self) -> bool:
        """True when the last returned batch was the final one of its epoch."""
        return self._position >= len(self._ensure_schedule())

    # --- checkpointing ---
    def _layout(self) -> str:
        parts = [(s.dataset_id, s.repeats, sorted((b, len(r)) for b, r in s.buckets.items())) for s in self.sources]
        return hashlib.sha256(repr((parts, self.batch_size, self.world_size, self.mode)).encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        self._ensure_schedule()
        return {"version": _STATE_VERSION, "epoch": self._epoch, "position": self._position, "seed": self.seed,
                "layout": self._layout(), "streams_at_epoch_start": dict(self._streams_at_start)}

    def _run_epoch_hook(self, resumed: bool) -> None:
        if self.epoch_start_hook is not None and self._epoch > 1:
            updates = self.epoch_start_hook(self._epoch, resumed)
            if updates:
                self.replace_indexes(updates)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch = int(state["epoch"])
        self._run_epoch_hook(resumed=True)
        for dataset_id, stream in self._streams.items():
            stream.restore(state.get("streams_at_epoch_start", {}).get(dataset_id, [0, 0]))
        self._plan_epoch()
        same = state.get("seed") == self.seed and state.get("layout") == self._layout()
        if same:
            self._position = min(int(state["position"]), len(self._schedule))
        else:
            logger.warning("the datasets, batch size, process count or seed changed since this sampler state was "
                           "saved; restarting epoch %d from its first batch", self._epoch)
            self._position = 0

    # --- reporting ---
    def describe(self) -> str:
        total = sum(s.weight for s in self.sources) or 1.0
        lines = [f"sampler: {self.steps_per_epoch} steps per epoch per process "
                 f"(batch {self.batch_size} x {self.world_size} processes, {self.mode})"]
        for source in self.sources:
            extra = "" if source.counts_toward_epoch else ", ignore_epochs"
            lines.append(f"  {source.dataset_id}: {source.samples_per_epoch} samples per epoch "
                         f"(repeats={source.repeats}), draw share {source.weight / total:.0%}{extra}")
        return "\n".join(lines)


def _repeats_explicit(spec) -> bool:
    """Whether the user wrote ``repeats`` for this dataset (oversubscription leaves those alone)."""
    written = getattr(spec, "explicit_keys", None)
    return "repeats" in written if written is not None else bool(_spec_value(spec, "repeats", 0))


def _regularisation_marked(buckets: dict[str, list[ImageRecord]], spec) -> dict[str, list[ImageRecord]]:
    if not _spec_value(spec, "is_regularisation_data", False):
        return buckets
    return {bucket: [r if r.is_regularisation else dataclasses.replace(r, is_regularisation=True) for r in records]
            for bucket, records in buckets.items()}
