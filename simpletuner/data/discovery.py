"""Find the usable images of a dataset, bucket them and remember the result.

``discover_dataset`` lists the dataset's image files, reads each new or
changed file's size (and decodes it once, to catch truncated files), plans
its resize/crop with buckets.plan_image, and reads its captions. Files that
cannot be used become ``Rejection``s, each logged once. Repeats are not
expanded here; the sampler does that.

The bucket index is saved beside the data as
``aspect_ratio_bucket_indices_<id>.json`` with the options that produced it
and each file's stamp. The next run reuses entries of unchanged files. If an option that moves or
resizes crops changed (resolution, crop settings, downsampling, alignment...),
the run stops with a message naming it, unless ``--override_dataset_config`` is
set, in which case the index is rebuilt; a changed size or aspect filter is
simply applied again to the saved sizes.
With ``preserve_data_backend_cache`` or ``skip_file_discovery`` containing
"aspect" or "metadata", a saved index is trusted as it is: storage is not
listed and files are not stamped.
"""

from __future__ import annotations

import io
import json
import logging
import random
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from PIL import Image
from tqdm import tqdm

from simpletuner.data.buckets import ASPECT_OUT_OF_RANGE, NO_BUCKET, TOO_SMALL, ImagePlan, SizeRejection, \
    filter_config, geometry_config, plan_image, planning_config, uses_random_planning
from simpletuner.data.captions import CaptionSource, MissingCaption
from simpletuner.data.dataset_config import DatasetConfigError
from simpletuner.data.dataset_spec import DatasetSpec
from simpletuner.data.storage.base import Storage
from simpletuner.data.storage.local import LocalStorage
from simpletuner.data.types import DatasetIndex, ImageRecord, Rejection

logger = logging.getLogger("simpletuner.data")

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "jfif", "webp", "bmp", "tif", "tiff", "gif")
INDEX_FORMAT = 1
UNREADABLE = "unreadable image"
_UNWANTED_CATEGORIES = (TOO_SMALL, ASPECT_OUT_OF_RANGE, NO_BUCKET)
_CHUNK = 256
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


class DatasetIndexError(DatasetConfigError):
    """A dataset whose saved index does not match its config, or that has no usable image."""

    def __init__(self, message: str):
        super().__init__([message])


class UnreadableImage(Exception):
    pass


@dataclass(frozen=True)
class _Entry:
    """What is known about one image file; saved in the bucket index."""

    stamp: str
    size: tuple[int, int] | None = None
    plan: ImagePlan | None = None
    rejected: str | None = None  # "category: detail"

    def to_json(self) -> dict:
        data: dict = {"stamp": self.stamp, "size": list(self.size) if self.size else None}
        if self.plan is not None:
            data.update(intermediate=list(self.plan.intermediate_size), crop=list(self.plan.crop_offset),
                        target=list(self.plan.target_size))
        if self.rejected is not None:
            data["rejected"] = self.rejected
        return data

    @classmethod
    def from_json(cls, data: dict) -> "_Entry":
        plan = None
        if "target" in data:
            plan = ImagePlan(tuple(data["intermediate"]), tuple(data["crop"]), tuple(data["target"]))
        size = tuple(data["size"]) if data.get("size") else None
        return cls(stamp=data["stamp"], size=size, plan=plan, rejected=data.get("rejected"))


@dataclass(frozen=True)
class _Outcome:
    path: str
    entry: _Entry
    captions: tuple[str, ...] = ()
    caption_problem: str | None = None


def bucket_index_name(spec: DatasetSpec) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.id)
    return f"aspect_ratio_bucket_indices_{safe}.json"


def discover_dataset(spec: DatasetSpec, storage: Storage, settings, progress: bool = True) -> DatasetIndex:
    """Index one image dataset: usable records with their plans and captions, and the rejected files."""
    saved = _load_saved(spec, storage)
    entries, refilter = _saved_entries(spec, storage, saved, bool(getattr(settings, "override_dataset_config", False)))
    trusted = entries is not None and _trusts_saved_index(spec)
    if trusted:
        logger.info("%s: using the saved bucket index without scanning storage.", spec.where())
        paths = sorted(entries)
    else:
        paths = storage.list_files(extensions=IMAGE_EXTENSIONS)
    worker = _Examiner(spec, storage, entries or {}, trusted, refilter)
    outcomes = _examine_all(worker, paths, spec, storage, settings, progress)
    index = _build_index(spec, storage, outcomes)
    if outcomes:
        _save_index(spec, storage, saved, {o.path: o.entry for o in outcomes})
    index = _limit_samples(spec, index)
    if not index.records:
        raise DatasetIndexError(_empty_message(spec, storage, index))
    return index


def _load_saved(spec: DatasetSpec, storage: Storage) -> dict | None:
    name = bucket_index_name(spec)
    try:
        data = json.loads(storage.read_bytes(name))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        logger.warning("%s: %s is damaged; rebuilding it.", spec.where(), storage.describe(name))
        return None
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        logger.info("%s: %s is from another version; rebuilding it.", spec.where(), storage.describe(name))
        return None
    return data


def _saved_entries(spec: DatasetSpec, storage: Storage, saved: dict | None,
                   override: bool) -> tuple[dict[str, _Entry] | None, bool]:
    """The saved entries and whether their filters must be applied again.

    A change of an option that moves or resizes crops is refused (or, with
    override, the index is dropped); a change of a pure filter (minimum size,
    aspect limits) only re-applies the filters to the saved sizes.
    """
    if saved is None:
        return None, False
    before = saved.get("config", {})
    changed = _changed(before, geometry_config(spec))
    if changed:
        details = ", ".join(f"{key}: {before[key]!r} -> {value!r}" for key, value in changed.items())
        location = storage.describe(bucket_index_name(spec))
        if not override:
            raise DatasetIndexError(
                f"{spec.where()}: the options changed since its bucket index was built ({details}). "
                f"Restore the previous values, or set --override_dataset_config to rebuild {location} "
                "with the new ones (cached latents for this dataset are then rebuilt too)."
            )
        logger.warning("%s: rebuilding the bucket index because %s (--override_dataset_config).",
                       spec.where(), details)
        return None, False
    refilter = bool(_changed(before, filter_config(spec)))
    if refilter:
        logger.info("%s: size/aspect filters changed; applying them to the saved index.", spec.where())
    return {path: _Entry.from_json(data) for path, data in saved.get("files", {}).items()}, refilter


def _changed(before: dict, now: dict) -> dict:
    return {key: value for key, value in now.items() if key in before and before[key] != value}


def _trusts_saved_index(spec: DatasetSpec) -> bool:
    skipped = set(spec.skip_file_discovery)
    return spec.preserve_data_backend_cache or bool(skipped & {"aspect", "metadata"})


class _Examiner:
    """Works out one file's entry and captions; runs in worker threads."""

    def __init__(self, spec: DatasetSpec, storage: Storage, known: dict[str, _Entry], trusted: bool,
                 refilter: bool):
        self.spec = spec
        self.storage = storage
        self.known = known
        self.trusted = trusted
        self.refilter = refilter
        self.captions = CaptionSource(spec, storage)

    def __call__(self, path: str) -> _Outcome:
        entry = self._entry(path)
        if entry.plan is None:
            return _Outcome(path, entry)
        try:
            return _Outcome(path, entry, captions=self.captions.captions_for(path))
        except MissingCaption as problem:
            return _Outcome(path, entry, caption_problem=str(problem))

    def _entry(self, path: str) -> _Entry:
        previous = self.known.get(path)
        if previous is not None and self.trusted:
            return self._reuse(path, previous)
        try:
            stamp = self.storage.stamp(path)
        except FileNotFoundError:
            return _Entry("", rejected=f"{UNREADABLE}: the file disappeared while the dataset was scanned")
        if previous is not None and previous.stamp == stamp:
            return self._reuse(path, previous)
        try:
            size = probe_image(self.storage, path)
        except UnreadableImage as problem:
            return _Entry(stamp, rejected=f"{UNREADABLE}: {problem}")
        return entry_for_size(self.spec, path, stamp, size)

    def _reuse(self, path: str, previous: _Entry) -> _Entry:
        if self.refilter and previous.size is not None:
            return entry_for_size(self.spec, path, previous.stamp, previous.size)
        return previous


def entry_for_size(spec: DatasetSpec, path: str, stamp: str, size: tuple[int, int], epoch: int = 0) -> _Entry:
    planned = plan_image(size[0], size[1], spec, plan_rng(spec, path, epoch))
    if isinstance(planned, SizeRejection):
        return _Entry(stamp, size=size, rejected=str(planned))
    return _Entry(stamp, size=size, plan=planned)


def plan_rng(spec: DatasetSpec, path: str, epoch: int = 0) -> random.Random:
    """A generator fixed by seed, dataset, file and epoch, so plans are reproducible and order-independent."""
    return random.Random(f"{spec.seed}/{spec.id}/{path}/{epoch}")


def probe_image(storage: Storage, path: str) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied). Decodes once to catch truncated files."""
    try:
        # A local file is opened by path (describe() gives it) so PIL reads it directly instead of a copy.
        source = storage.describe(path) if isinstance(storage, LocalStorage) else io.BytesIO(storage.read_bytes(path))
        with Image.open(source) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees when displayed
                width, height = height, width
            image.draft("RGB", (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))  # JPEG: cheap decode
            image.load()
    except _DECODE_ERRORS as exc:
        raise UnreadableImage(str(exc) or type(exc).__name__) from exc
    return width, height


def _examine_all(worker: _Examiner, paths: list[str], spec: DatasetSpec, storage: Storage, settings,
                 progress: bool) -> list[_Outcome]:
    workers = max(1, min(int(getattr(settings, "aspect_bucket_worker_count", 8) or 8), 16))
    interval = spec.metadata_update_interval or 3600
    outcomes: list[_Outcome] = []
    last_save = time.monotonic()
    bar = tqdm(total=len(paths), desc=f"Indexing '{spec.id}'", unit="img", disable=not progress, leave=False)
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(paths), _CHUNK):
            for outcome in pool.map(worker, paths[start:start + _CHUNK]):
                outcomes.append(outcome)
                bar.update(1)
            if time.monotonic() - last_save > interval:  # keep progress if a long scan is interrupted
                _write_index(spec, storage, {**worker.known, **{o.path: o.entry for o in outcomes}})
                last_save = time.monotonic()
    return outcomes


def _build_index(spec: DatasetSpec, storage: Storage, outcomes: list[_Outcome]) -> DatasetIndex:
    index = DatasetIndex(dataset_id=spec.id, files_seen=len(outcomes))
    for outcome in outcomes:
        entry = outcome.entry
        reason = entry.rejected or outcome.caption_problem
        if reason is None:
            index.records.append(_record(spec, outcome))
            continue
        index.rejected.append(Rejection(outcome.path, reason))
        _report_rejection(spec, storage, outcome.path, reason)
    return index


def _record(spec: DatasetSpec, outcome: _Outcome) -> ImageRecord:
    entry = outcome.entry
    return ImageRecord(
        dataset_id=spec.id,
        path=outcome.path,
        captions=outcome.captions,
        original_size=entry.size,
        intermediate_size=entry.plan.intermediate_size,
        crop_offset=entry.plan.crop_offset,
        target_size=entry.plan.target_size,
        is_regularisation=spec.is_regularisation_data,
        source_stamp=entry.stamp,
    )


def _report_rejection(spec: DatasetSpec, storage: Storage, path: str, reason: str) -> None:
    category = rejection_category(reason)
    delete = (spec.delete_problematic_images and category == UNREADABLE) or (
        spec.delete_unwanted_images and category in _UNWANTED_CATEGORIES)
    if delete:
        storage.delete(path)
        option = "delete_problematic_images" if category == UNREADABLE else "delete_unwanted_images"
        logger.warning("dataset '%s': deleted %s: %s (%s)", spec.id, storage.describe(path), reason, option)
    else:
        logger.warning("dataset '%s': skipping %s: %s", spec.id, storage.describe(path), reason)


def rejection_category(reason: str) -> str:
    return reason.split(":", 1)[0]


def _save_index(spec: DatasetSpec, storage: Storage, saved: dict | None, entries: dict[str, _Entry]) -> None:
    entries = {path: entry for path, entry in entries.items() if not _was_deleted(spec, entry)}
    document = _index_document(spec, entries)
    if saved is not None and saved == json.loads(json.dumps(document)):
        return
    _write_index(spec, storage, entries)


def _was_deleted(spec: DatasetSpec, entry: _Entry) -> bool:
    if entry.rejected is None:
        return False
    category = rejection_category(entry.rejected)
    return (spec.delete_problematic_images and category == UNREADABLE) or (
        spec.delete_unwanted_images and category in _UNWANTED_CATEGORIES)


def _index_document(spec: DatasetSpec, entries: dict[str, _Entry]) -> dict:
    statistics: dict[str, int] = {"total_processed": len(entries)}
    for entry in entries.values():
        if entry.rejected:
            category = rejection_category(entry.rejected)
            statistics[category] = statistics.get(category, 0) + 1
    return {
        "format": INDEX_FORMAT,
        "dataset_id": spec.id,
        "config": planning_config(spec),
        "statistics": statistics,
        "files": {path: entries[path].to_json() for path in sorted(entries)},
    }


def _write_index(spec: DatasetSpec, storage: Storage, entries: dict[str, _Entry]) -> None:
    data = json.dumps(_index_document(spec, entries), indent=1).encode("utf-8")
    try:
        storage.write_bytes(bucket_index_name(spec), data)
    except OSError as exc:
        logger.warning("%s: could not save the bucket index to %s (%s); the next start scans again.",
                       spec.where(), storage.describe(bucket_index_name(spec)), exc)


def _limit_samples(spec: DatasetSpec, index: DatasetIndex) -> DatasetIndex:
    """max_num_samples: a subset chosen with the dataset id as seed, the same on every run."""
    limit = spec.max_num_samples
    if not limit or len(index.records) <= limit:
        return index
    chosen = set(random.Random(spec.id).sample(range(len(index.records)), limit))
    kept = [record for position, record in enumerate(index.records) if position in chosen]
    logger.info("%s: using %d of %d images (max_num_samples).", spec.where(), limit, len(index.records))
    return replace(index, records=kept)


def replan_for_epoch(index: DatasetIndex, spec: DatasetSpec, settings, epoch: int) -> DatasetIndex:
    """New random crops/buckets for an epoch, as the reference rebuilds them each epoch.

    Only when the dataset plans randomly, clears its VAE cache each epoch and
    --aspect_bucket_disable_rebuild is off; otherwise the index is returned
    unchanged. Epoch 0 or 1 gives the plans of discovery. Reads no files.
    """
    if (not uses_random_planning(spec) or not spec.vae_cache_clear_each_epoch
            or getattr(settings, "aspect_bucket_disable_rebuild", False) or epoch <= 1):
        return index
    records = []
    for record in index.records:
        entry = entry_for_size(spec, record.path, record.source_stamp, tuple(record.original_size), epoch)
        if entry.plan is None:
            continue
        records.append(replace(record, intermediate_size=entry.plan.intermediate_size,
                               crop_offset=entry.plan.crop_offset, target_size=entry.plan.target_size))
    return replace(index, records=records)


def summarize(index: DatasetIndex, examples: int = 5) -> str:
    """A short report for `simpletuner check`: files found, bucket sizes, rejections grouped by reason."""
    lines = [f"dataset '{index.dataset_id}': {index.files_seen} image files found, {len(index.records)} usable, "
             f"{len(index.rejected)} skipped"]
    buckets = index.buckets()
    if buckets:
        lines.append("  buckets:")
        for name in sorted(buckets, key=lambda b: (-len(buckets[b]), b)):
            lines.append(f"    {name}: {len(buckets[name])}")
    lines.extend(_rejection_lines(index.rejected, examples))
    return "\n".join(lines)


def _rejection_lines(rejected: list[Rejection], examples: int) -> list[str]:
    groups: dict[str, list[Rejection]] = {}
    for rejection in rejected:
        groups.setdefault(rejection_category(rejection.reason), []).append(rejection)
    if not groups:
        return []
    lines = ["  skipped:"]
    for category in sorted(groups, key=lambda c: -len(groups[c])):
        members = groups[category]
        lines.append(f"    {category} ({len(members)}):")
        for rejection in members[:examples]:
            lines.append(f"      {rejection.path}: {rejection.reason.split(':', 1)[-1].strip()}")
        if len(members) > examples:
            lines.append(f"      ... and {len(members) - examples} more")
    return lines


def _empty_message(spec: DatasetSpec, storage: Storage, index: DatasetIndex) -> str:
    if index.files_seen == 0:
        return (f"{spec.where()}: no image files ({', '.join(IMAGE_EXTENSIONS)}) were found in {storage.root}; "
                "check instance_data_dir / aws_data_prefix.")
    counts: dict[str, int] = {}
    for rejection in index.rejected:
        category = rejection_category(rejection.reason)
        counts[category] = counts.get(category, 0) + 1
    reasons = ", ".join(f"{count} {category}" for category, count in sorted(counts.items(), key=lambda i: -i[1]))
    return (f"{spec.where()}: none of the {index.files_seen} image files in {storage.root} is usable ({reasons}). "
            "Each skipped file was logged above; adjust minimum_image_size / aspect limits, add the missing "
            "captions, or fix the files.")
