"""The VAE latent cache of one image dataset.

An entry's key hashes everything that changes its content: the file (path and
stamp), the geometry (intermediate size, crop offset, target size) and the
model fingerprint, so stale latents are never reused. A small manifest maps
each path to the inputs of its last entry; it only serves to explain *why* an
entry must be encoded again (``CachePlan.reasons``) and to find old entries to
remove or, with ``vae_cache_scan_behaviour=sync``, to adopt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from PIL import Image
from tqdm.auto import tqdm

from simpletuner.caching.manifest import CacheManifest
from simpletuner.caching.plans import PlanReasons
from simpletuner.caching.store import BackgroundWriter, CacheEntryError, TensorStore
from simpletuner.data.storage.base import Storage
from simpletuner.data.types import ImageRecord, Rejection

logger = logging.getLogger(__name__)

REASON_NEW = "new file"
REASON_FILE_CHANGED = "file changed"
REASON_GEOMETRY = "resolution or crop changed"
REASON_MODEL = "model changed"
REASON_MISSING = "cache entry missing"
REASON_BROKEN = "cache entry unreadable or wrong shape"

LATENTS = "latents"
SCAN_BEHAVIOURS = ("recreate", "sync")
_MANIFEST_SAVE_EVERY = 512  # entries; bounds what an interrupted build leaves unexplained
# What a broken or unsupported image file raises while it is decoded.
IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)

PixelLoader = Callable[[ImageRecord, Storage], torch.Tensor]
ImageEncoder = Callable[[torch.Tensor], torch.Tensor]


def _geometry(record: ImageRecord) -> list[int]:
    return [*record.intermediate_size, *record.crop_offset, *record.target_size]


def _with_geometry(record: ImageRecord, geometry: list[int]) -> ImageRecord:
    iw, ih, top, left, tw, th = geometry
    return dataclasses.replace(record, intermediate_size=(iw, ih), crop_offset=(top, left), target_size=(tw, th))


def latent_shape_problem(latents: torch.Tensor, target_size: tuple[int, int]) -> str | None:
    """Why ``latents`` cannot belong to an image of ``target_size`` (width, height), or None."""
    if latents.ndim < 3:
        return f"latents have shape {tuple(latents.shape)}, expected (channels, height, width)"
    height, width = latents.shape[-2:]
    target_w, target_h = target_size
    if width == 0 or target_w % width or target_h % height or target_w // width != target_h // height:
        return (f"latents of {width}x{height} do not match the bucket {target_w}x{target_h} "
                "(expected the same downscale on both sides)")
    return None


def default_pixel_loader(record: ImageRecord, storage: Storage) -> torch.Tensor:
    from simpletuner.data.transforms import load_pixels

    return load_pixels(record, storage)


@dataclass
class CachePlan(PlanReasons):
    """Which records already have entries and which must be (re)encoded, with the reason for each."""

    cached: list[ImageRecord] = field(default_factory=list)
    to_encode: list[tuple[ImageRecord, str]] = field(default_factory=list)

    @property
    def records_to_encode(self) -> list[ImageRecord]:
        return [record for record, _ in self.to_encode]


@dataclass
class BuildReport:
    encoded: int = 0
    failed: list[Rejection] = field(default_factory=list)


@dataclass
class ScanResult:
    """Outcome of ``scan_for_errors``: records to use (re-bucketed under sync) and problems found per path."""

    records: list[ImageRecord]
    problems: dict[str, str] = field(default_factory=dict)
    adopted: int = 0  # records whose geometry was synced to an existing entry


class LatentCache:
    def __init__(self, store: TensorStore, family_fingerprint: str, name: str = "latents"):
        self.store = store
        self.family_fingerprint = family_fingerprint
        self.manifest = CacheManifest(store, name)  # image path -> {key, stamp, geometry, model}
        self._known_problems: dict[str, str] = {}  # path -> reason, from the last scan
        self._queued: dict[str, ImageRecord] = {}  # key -> record, saves in flight during build
        self._saves_since_flush = 0

    # --- keys and manifest ---
    def key_for(self, record: ImageRecord) -> str:
        inputs = [record.path, record.source_stamp, _geometry(record), self.family_fingerprint]
        return hashlib.sha256(json.dumps(inputs).encode("utf-8")).hexdigest()[:40]

    def _remember(self, record: ImageRecord, key: str) -> str | None:
        """Record ``key`` as the entry of ``record.path``; returns the key it replaces, if different."""
        previous = self.manifest.set(record.path, {"key": key, "stamp": record.source_stamp,
                                                   "geometry": _geometry(record), "model": self.family_fingerprint})
        previous_key = (previous or {}).get("key")
        return previous_key if previous_key != key else None

    def flush(self) -> None:
        """Persist the manifest if entries were added since the last flush."""
        self.manifest.flush()

    # --- planning ---
    def _reason(self, record: ImageRecord) -> str:
        if record.path in self._known_problems:
            return REASON_BROKEN
        previous = self.manifest.entries().get(record.path)
        if previous is None:
            return REASON_NEW
        if previous.get("stamp") != record.source_stamp:
            return REASON_FILE_CHANGED
        if previous.get("geometry") != _geometry(record):
            return REASON_GEOMETRY
        if previous.get("model") != self.family_fingerprint:
            return REASON_MODEL
        return REASON_MISSING

    def plan(self, records: Iterable[ImageRecord]) -> CachePlan:
        stored = self.store.keys()
        plan = CachePlan()
        for record in records:
            if self.key_for(record) in stored:
                plan.cached.append(record)
            else:
                plan.to_encode.append((record, self._reason(record)))
        return plan

    # --- reading and writing single entries ---
    def get(self, record: ImageRecord) -> torch.Tensor:
        tensors, _ = self.store.load(self.key_for(record))
        if LATENTS not in tensors:
            raise CacheEntryError(self.store.describe(self.key_for(record)), f"has no {LATENTS!r} tensor")
        return tensors[LATENTS]

    def _entry_meta(self, record: ImageRecord) -> dict:
        return {"path": record.path, "dataset_id": record.dataset_id, "target_size": list(record.target_size),
                "geometry": _geometry(record), "model": self.family_fingerprint}

    def put(self, record: ImageRecord, latents: torch.Tensor) -> None:
        """Store one record's latents (used by on-demand encoding); call ``flush`` now and then."""
        key = self.key_for(record)
        self.store.save(key, {LATENTS: latents}, self._entry_meta(record))
        self._forget_replaced(self._remember(record, key))

    def _forget_replaced(self, old_key: str | None) -> None:
        if old_key is not None:
            self._delete_entry(old_key)

    def _delete_entry(self, key: str) -> None:
        try:
            self.store.delete(key)
        except FileNotFoundError:  # another process removed it first
            pass

    def clear(self) -> int:
        """Delete every entry this cache's manifest knows about, and the manifest. Returns the count."""
        keys = {entry["key"] for entry in self.manifest.clear()}
        for key in keys:
            self._delete_entry(key)
        self.manifest.delete_document()  # last: until then the manifest still lists what may be left
        self._known_problems.clear()
        return len(keys)

    # --- building ---
    def build(self, records: Iterable[ImageRecord], storage: Storage, encode_fn: ImageEncoder, batch_size: int,
              progress: bool = True, *, load_fn: PixelLoader | None = None, read_workers: int = 4,
              write_workers: int = 4) -> BuildReport:
        """Encode every record without a current entry, in same-bucket batches.

        Images of the next batches are decoded on ``read_workers`` threads while
        ``encode_fn`` runs, and entries are written on ``write_workers`` threads,
        so throughput stays close to the encoder's own rate.
        """
        missing = self.plan(records).records_to_encode
        report = BuildReport()
        if not missing:
            return report
        batch_size, read_workers = max(1, batch_size), max(1, read_workers)
        batches = _same_bucket_batches(missing, batch_size)
        self._queued.clear()
        loader = load_fn or default_pixel_loader
        bar = tqdm(total=len(missing), desc=f"Encoding latents ({self.store.storage.root})", unit="img",
                   disable=not progress)
        readers = ThreadPoolExecutor(max_workers=read_workers, thread_name_prefix="latent-reader")
        try:
            with BackgroundWriter(self.store, workers=write_workers) as writer:
                ahead = max(2, -(-read_workers // batch_size) + 1)  # batches decoding while one encodes
                pending_reads = [_submit_batch(readers, loader, batch, storage) for batch in batches[:ahead]]
                for index, batch in enumerate(batches):
                    if index + ahead < len(batches):
                        pending_reads.append(_submit_batch(readers, loader, batches[index + ahead], storage))
                    loaded, failed = _collect_batch(batch, pending_reads[index], storage)
                    pending_reads[index] = None  # release the decoded pixels
                    report.failed.extend(failed)
                    if loaded:
                        report.encoded += self._encode_and_queue(loaded, encode_fn, writer)
                    bar.update(len(batch))
                self._finish_saves(writer.drain())
        finally:
            readers.shutdown(wait=True, cancel_futures=True)
            bar.close()
            self.flush()
        return report

    def _encode_and_queue(self, loaded: list[tuple[ImageRecord, torch.Tensor]], encode_fn: ImageEncoder,
                          writer: BackgroundWriter) -> int:
        pixels = torch.stack([pixel for _, pixel in loaded])
        with torch.no_grad():
            latents = encode_fn(pixels)
        if latents.shape[0] != len(loaded):
            raise RuntimeError(f"the image encoder returned {latents.shape[0]} latents for {len(loaded)} images")
        latents = latents.detach().to("cpu")
        for (record, _), latent in zip(loaded, latents):
            key = self.key_for(record)
            self._finish_saves(writer.submit(key, {LATENTS: latent}, self._entry_meta(record)))
            self._queued[key] = record
        return len(loaded)

    def _finish_saves(self, keys: list[str]) -> None:
        for key in keys:
            record = self._queued.pop(key)
            self._forget_replaced(self._remember(record, key))
            self._known_problems.pop(record.path, None)
            self._saves_since_flush += 1
        if self._saves_since_flush >= _MANIFEST_SAVE_EVERY:
            self._saves_since_flush = 0
            self.flush()

    # --- integrity scan ---
    def scan(self, records: list[ImageRecord], behaviour: str = "recreate", progress: bool = True,
             workers: int = 4, verify: bool = True) -> ScanResult:
        """Load every cached entry of ``records`` and check it (scan_for_errors).

        Broken entries are deleted so they are encoded again. With ``sync``,
        records whose geometry changed but whose old entry (same file, same
        model) is intact are switched back to the geometry of that entry
        instead of being re-encoded. ``verify=False`` trusts the entries that
        exist (other ranks, after rank 0 verified) and only applies sync.
        """
        if behaviour not in SCAN_BEHAVIOURS:
            raise ValueError(f"vae_cache_scan_behaviour={behaviour!r} is not one of {', '.join(SCAN_BEHAVIOURS)}")
        stored = self.store.keys()
        result = ScanResult(records=list(records))
        keys = [self.key_for(record) for record in result.records]
        candidates = {i: key for i, key in enumerate(keys) if key in stored}
        if behaviour == "sync":
            candidates.update(self._sync_candidates(result.records, candidates, stored))
        if not verify:
            entries = self.manifest.entries()
            for i, key in candidates.items():
                self._apply_check(result, i, key, (None, entries.get(result.records[i].path, {}).get("geometry")))
            return result
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="latent-scan") as pool:
            checks = {i: pool.submit(self._check_entry, key) for i, key in candidates.items()}
            for i, future in tqdm(checks.items(), desc="Scanning latent cache", unit="entry", disable=not progress):
                self._apply_check(result, i, candidates[i], future.result())
        return result

    def _sync_candidates(self, records: list[ImageRecord], already: dict[int, str],
                         stored: set[str]) -> dict[int, str]:
        entries = self.manifest.entries()
        found = {}
        for i, record in enumerate(records):
            previous = entries.get(record.path)
            if i in already or previous is None or previous.get("key") not in stored:
                continue
            if previous.get("stamp") == record.source_stamp and previous.get("model") == self.family_fingerprint:
                found[i] = previous["key"]
        return found

    def _check_entry(self, key: str) -> tuple[str | None, list[int] | None]:
        """(problem or None, the entry's geometry) for one stored entry."""
        try:
            tensors, meta = self.store.load(key)
        except CacheEntryError as error:
            return error.problem, None
        latents = tensors.get(LATENTS)
        geometry = meta.get("geometry")
        if latents is None or not isinstance(geometry, list) or len(geometry) != 6:
            return "entry lacks latents or geometry", None
        problem = latent_shape_problem(latents, (geometry[4], geometry[5]))
        return problem, geometry

    def _apply_check(self, result: ScanResult, index: int, key: str,
                     check: tuple[str | None, list[int] | None]) -> None:
        problem, geometry = check
        record = result.records[index]
        if problem is not None:
            result.problems[record.path] = problem
            self._known_problems[record.path] = problem
            self._delete_entry(key)
            return
        if key != self.key_for(record):  # sync: adopt the geometry of the intact old entry
            result.records[index] = _with_geometry(record, geometry)
            result.adopted += 1


def _same_bucket_batches(records: list[ImageRecord], batch_size: int) -> list[list[ImageRecord]]:
    by_bucket: dict[tuple[int, int], list[ImageRecord]] = {}
    for record in records:
        by_bucket.setdefault(record.target_size, []).append(record)
    batches = []
    for size in sorted(by_bucket):
        group = by_bucket[size]
        batches.extend(group[start:start + batch_size] for start in range(0, len(group), batch_size))
    return batches


def _submit_batch(pool: ThreadPoolExecutor, loader: PixelLoader, batch: list[ImageRecord],
                  storage: Storage) -> list[Future]:
    return [pool.submit(loader, record, storage) for record in batch]


def _collect_batch(batch: list[ImageRecord], futures: list[Future],
                   storage: Storage) -> tuple[list[tuple[ImageRecord, torch.Tensor]], list[Rejection]]:
    loaded, failed = [], []
    for record, future in zip(batch, futures):
        try:
            pixels = future.result()
        except IMAGE_READ_ERRORS as error:
            failed.append(Rejection(record.path, f"could not be read for encoding ({error})"))
            logger.warning("skipping %s: %s", storage.describe(record.path), error)
            continue
        expected = (3, record.target_size[1], record.target_size[0])
        if tuple(pixels.shape) != expected:
            failed.append(Rejection(record.path, f"decoded to {tuple(pixels.shape)}, expected {expected}"))
            continue
        loaded.append((record, pixels))
    return loaded, failed
