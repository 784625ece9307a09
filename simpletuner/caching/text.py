"""The text-embedding cache: one entry per distinct caption.

The key hashes the caption with the model fingerprint. The empty caption is
always part of the cache because caption dropout swaps it in. A manifest maps
a digest of each caption to the fingerprint it was last encoded with, so a
plan can tell a new caption from one that needs re-encoding for a new model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from simpletuner.caching.manifest import CacheManifest
from simpletuner.caching.plans import PlanReasons
from simpletuner.caching.store import BackgroundWriter, TensorStore

REASON_NEW_CAPTION = "new caption"
REASON_MODEL = "model changed"
REASON_MISSING = "cache entry missing"

EMPTY_CAPTION = ""
_MANIFEST_SAVE_EVERY = 2048

TextEncoder = Callable[[list[str]], dict[str, torch.Tensor]]


def _caption_digest(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]


@dataclass
class TextCachePlan(PlanReasons):
    cached: list[str] = field(default_factory=list)
    to_encode: list[tuple[str, str]] = field(default_factory=list)  # (caption, reason)

    @property
    def captions_to_encode(self) -> list[str]:
        return [caption for caption, _ in self.to_encode]


def unique_captions(captions: Iterable[str]) -> list[str]:
    """Distinct captions plus the empty one, in a stable order (shortest first, which batches well)."""
    return sorted(set(captions) | {EMPTY_CAPTION}, key=lambda caption: (len(caption), caption))


class TextEmbedCache:
    def __init__(self, store: TensorStore, family_fingerprint: str, name: str = "text"):
        self.store = store
        self.family_fingerprint = family_fingerprint
        self.manifest = CacheManifest(store, name)  # caption digest -> fingerprint it was encoded with
        self._empty: dict[str, torch.Tensor] | None = None

    def key_for(self, caption: str) -> str:
        return hashlib.sha256(json.dumps([caption, self.family_fingerprint]).encode("utf-8")).hexdigest()[:40]

    def _remember(self, caption: str) -> None:
        self.manifest.set(_caption_digest(caption), self.family_fingerprint)

    def flush(self) -> None:
        self.manifest.flush()

    def plan(self, captions: Iterable[str]) -> TextCachePlan:
        stored = self.store.keys()
        entries = self.manifest.entries()
        plan = TextCachePlan()
        for caption in unique_captions(captions):
            if self.key_for(caption) in stored:
                plan.cached.append(caption)
                continue
            previous = entries.get(_caption_digest(caption))
            if previous is None:
                reason = REASON_NEW_CAPTION
            elif previous != self.family_fingerprint:
                reason = REASON_MODEL
            else:
                reason = REASON_MISSING
            plan.to_encode.append((caption, reason))
        return plan

    def build(self, captions: Iterable[str], encode_fn: TextEncoder, batch_size: int, progress: bool = True,
              *, write_workers: int = 4) -> int:
        """Encode every caption (and "") that has no current entry; returns how many were encoded."""
        missing = self.plan(captions).captions_to_encode
        if not missing:
            return 0
        batch_size = max(1, batch_size)
        saved_since_flush = 0
        bar = tqdm(total=len(missing), desc="Encoding text embeds", unit="caption", disable=not progress)
        try:
            with BackgroundWriter(self.store, workers=write_workers) as writer:
                for start in range(0, len(missing), batch_size):
                    chunk = missing[start:start + batch_size]
                    for caption, tensors in zip(chunk, self._encode(chunk, encode_fn)):
                        writer.submit(self.key_for(caption), tensors, {"caption": caption,
                                                                      "model": self.family_fingerprint})
                    # Drain per chunk so the manifest never names an entry that is not written yet.
                    writer.drain()
                    for caption in chunk:
                        self._remember(caption)
                    saved_since_flush += len(chunk)
                    if saved_since_flush >= _MANIFEST_SAVE_EVERY:
                        saved_since_flush = 0
                        self.flush()
                    bar.update(len(chunk))
        finally:
            bar.close()
            self.flush()
        return len(missing)

    @staticmethod
    def _encode(chunk: list[str], encode_fn: TextEncoder) -> list[dict[str, torch.Tensor]]:
        with torch.no_grad():
            outputs = encode_fn(chunk)
        per_caption: list[dict[str, torch.Tensor]] = [{} for _ in chunk]
        for name, tensor in outputs.items():
            if tensor is None:
                continue
            if tensor.shape[0] != len(chunk):
                raise RuntimeError(f"the text encoder returned {name!r} with batch size {tensor.shape[0]} "
                                   f"for {len(chunk)} prompts")
            for index, row in enumerate(tensor.detach().to("cpu")):
                per_caption[index][name] = row
        return per_caption

    def put(self, caption: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store one caption's tensors (without batch dim); call ``flush`` afterwards."""
        self.store.save(self.key_for(caption), tensors, {"caption": caption, "model": self.family_fingerprint})
        self._remember(caption)

    def get(self, caption: str) -> dict[str, torch.Tensor]:
        """The cached tensors of ``caption`` without a batch dim. The empty caption is kept in memory."""
        if caption == EMPTY_CAPTION:
            if self._empty is None:
                self._empty = self.store.load(self.key_for(caption))[0]
            return self._empty
        return self.store.load(self.key_for(caption))[0]
