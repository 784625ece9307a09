"""The manifest a cache keeps beside its entries: what each entry was made from.

Both caches (latents and text embeddings) keep one JSON document mapping a source (an image
path, a caption digest) to what its entry was built with. It is read lazily, updated under a
lock from the writer threads, and written back only when something changed.
"""

from __future__ import annotations

import threading
from typing import Any

from simpletuner.caching.store import TensorStore

MANIFEST_VERSION = 1


class CacheManifest:
    def __init__(self, store: TensorStore, name: str):
        self.store = store
        self.document_name = f"{name}.manifest.json"
        self.lock = threading.Lock()
        self._entries: dict[str, Any] | None = None
        self._dirty = False

    def entries(self) -> dict[str, Any]:
        """The live mapping (read from the store on first use); change it only through ``set``/``clear``."""
        with self.lock:
            if self._entries is None:
                document = self.store.read_document(self.document_name) or {}
                self._entries = dict(document.get("entries", {}))
            return self._entries

    def set(self, source: str, value: Any) -> Any:
        """Record ``value`` for ``source``; returns the value it replaces (None when new)."""
        entries = self.entries()
        with self.lock:
            previous = entries.get(source)
            entries[source] = value
            self._dirty = True
        return previous

    def flush(self) -> None:
        """Write the manifest if it changed since the last flush."""
        entries = self.entries()
        with self.lock:
            if not self._dirty:
                return
            snapshot = {"version": MANIFEST_VERSION, "entries": dict(entries)}
            self._dirty = False
        self.store.write_document(self.document_name, snapshot)

    def clear(self) -> list[Any]:
        """Forget every entry (the stored document stays until ``delete_document``); returns the values."""
        entries = self.entries()
        with self.lock:
            values = list(entries.values())
            entries.clear()
            self._dirty = False
        return values

    def delete_document(self) -> None:
        try:
            self.store.storage.delete(self.document_name)
        except FileNotFoundError:
            pass
