"""The small storage interface every dataset and cache goes through.

Paths are storage-relative strings with '/' separators. Implementations:
local.py (a folder on disk) and s3.py (an S3-compatible bucket).
"""

from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable


@runtime_checkable
class Storage(Protocol):
    root: str  # human-readable location, used in messages (a folder path or s3://bucket/prefix)

    def list_files(self, prefix: str = "", extensions: Iterable[str] | None = None) -> list[str]:
        """All files under prefix (recursively), sorted, optionally filtered by lower-case extension without dot."""

    def exists(self, path: str) -> bool: ...

    def read_bytes(self, path: str) -> bytes: ...

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write atomically: a reader sees either the old content or the new, never a partial file."""

    def delete(self, path: str) -> None: ...

    def stamp(self, path: str) -> str:
        """A short string that changes whenever the file's content changes (size+mtime, or etag)."""

    def describe(self, path: str) -> str:
        """Full location of path for log and error messages."""
