"""Tensor records on a Storage: one safetensors blob per key, with JSON metadata.

Entries live at ``<first two characters of key>/<key>.safetensors`` so no
folder grows to millions of files. With ``compress=True`` the safetensors bytes
are zlib-compressed and prefixed with a short magic tag; ``load`` recognises
both forms, so a store can read entries written with either setting.
Writes go through ``Storage.write_bytes``, which is atomic.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from simpletuner.data.storage.base import Storage

logger = logging.getLogger(__name__)

ENTRY_SUFFIX = ".safetensors"
COMPRESSED_MAGIC = b"STZ1"  # can never start a valid safetensors file (its header length would be absurd)
_META_FIELD = "simpletuner"
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{2,128}$")
_COMPRESSION_LEVEL = 3


class CacheEntryError(Exception):
    """A cache entry that cannot be used; ``location`` names the file."""

    def __init__(self, location: str, problem: str,
                 fix: str = "Delete it (or the whole cache folder) so it is rebuilt."):
        super().__init__(f"cache entry {location}: {problem}. {fix}".rstrip())
        self.location = location
        self.problem = problem


class CacheEntryMissing(CacheEntryError):
    def __init__(self, location: str):
        super().__init__(location, "does not exist", fix="")


def _detached(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor that owns exactly its data (safetensors refuses views into bigger storage)."""
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def encode_entry(tensors: dict[str, torch.Tensor], meta: dict[str, Any], compress: bool) -> bytes:
    if not tensors:
        raise ValueError("a cache entry needs at least one tensor")
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"cache entry value {name!r} is {type(value).__name__}, expected a torch.Tensor")
    blob = safetensors_save({name: _detached(t) for name, t in tensors.items()},
                            metadata={_META_FIELD: json.dumps(meta, sort_keys=True)})
    if compress:
        return COMPRESSED_MAGIC + zlib.compress(blob, _COMPRESSION_LEVEL)
    return blob


def _read_meta(blob: bytes) -> dict[str, Any]:
    (header_length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + header_length])
    text = (header.get("__metadata__") or {}).get(_META_FIELD)
    return json.loads(text) if text else {}


def decode_entry(blob: bytes, location: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        if blob.startswith(COMPRESSED_MAGIC):
            blob = zlib.decompress(blob[len(COMPRESSED_MAGIC):])
        if len(blob) < 9:
            raise CacheEntryError(location, f"only {len(blob)} bytes, too short to be a tensor file")
        return safetensors_load(blob), _read_meta(blob)
    except (SafetensorError, zlib.error, struct.error, ValueError, UnicodeDecodeError) as error:
        raise CacheEntryError(location, f"unreadable ({error})") from error


class TensorStore:
    def __init__(self, storage: Storage, compress: bool = False):
        self.storage = storage
        self.compress = compress

    @staticmethod
    def path_for(key: str) -> str:
        if not _KEY_PATTERN.match(key):
            raise ValueError(f"invalid cache key {key!r}: use 2-128 letters, digits, '-' or '_'")
        return f"{key[:2]}/{key}{ENTRY_SUFFIX}"

    def describe(self, key: str) -> str:
        return self.storage.describe(self.path_for(key))

    def save(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.storage.write_bytes(self.path_for(key), encode_entry(tensors, meta, self.compress))

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        path = self.path_for(key)
        try:
            blob = self.storage.read_bytes(path)
        except FileNotFoundError as error:
            raise CacheEntryMissing(self.storage.describe(path)) from error
        return decode_entry(blob, self.storage.describe(path))

    def exists(self, key: str) -> bool:
        return self.storage.exists(self.path_for(key))

    def delete(self, key: str) -> None:
        self.storage.delete(self.path_for(key))

    def keys(self) -> set[str]:
        """Every stored key, from one listing of the storage (cheaper than many ``exists`` calls on S3)."""
        found = set()
        for path in self.storage.list_files(extensions=[ENTRY_SUFFIX.lstrip(".")]):
            name = path.rsplit("/", 1)[-1]
            found.add(name[: -len(ENTRY_SUFFIX)])
        return found

    # Small JSON documents (manifests) kept next to the entries.
    def write_document(self, name: str, document: Any) -> None:
        self.storage.write_bytes(name, json.dumps(document, sort_keys=True).encode("utf-8"))

    def read_document(self, name: str) -> Any | None:
        """The JSON document ``name``, or None when it does not exist or cannot be parsed."""
        try:
            return json.loads(self.storage.read_bytes(name))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            logger.warning("ignoring unreadable %s (%s); it will be rewritten", self.storage.describe(name), error)
            return None


class BackgroundWriter:
    """Saves entries on a few threads so serialising and writing overlap with encoding.

    At most ``max_pending`` saves are in flight; ``drain`` waits for them and
    returns the keys that finished, and re-raises the first write error.
    """

    def __init__(self, store: TensorStore, workers: int = 4, max_pending: int = 64):
        self.store = store
        self.max_pending = max(1, max_pending)
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cache-writer")
        self._pending: deque[tuple[str, Future]] = deque()

    def submit(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> list[str]:
        """Queue one save; returns the keys whose saves completed while making room."""
        done = []
        while len(self._pending) >= self.max_pending:
            done.append(self._finish_oldest())
        self._pending.append((key, self._pool.submit(self.store.save, key, tensors, meta)))
        return done

    def _finish_oldest(self) -> str:
        key, future = self._pending.popleft()
        future.result()
        return key

    def drain(self) -> list[str]:
        done = []
        while self._pending:
            done.append(self._finish_oldest())
        return done

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
