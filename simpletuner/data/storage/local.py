"""Storage on a local folder."""

from __future__ import annotations

import os
import tempfile

_UMASK = os.umask(0)
os.umask(_UMASK)
from typing import Iterable


class LocalStorage:
    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    def list_files(self, prefix: str = "", extensions: Iterable[str] | None = None) -> list[str]:
        wanted = {e.lower().lstrip(".") for e in extensions} if extensions else None
        base = self._full(prefix)
        found: list[str] = []
        for folder, dirs, files in os.walk(base, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if name.startswith("."):
                    continue
                if wanted is not None and os.path.splitext(name)[1].lower().lstrip(".") not in wanted:
                    continue
                found.append(os.path.relpath(os.path.join(folder, name), self.root).replace(os.sep, "/"))
        return sorted(found)

    def exists(self, path: str) -> bool:
        return os.path.exists(self._full(path))

    def read_bytes(self, path: str) -> bytes:
        with open(self._full(path), "rb") as handle:
            return handle.read()

    def write_bytes(self, path: str, data: bytes) -> None:
        target = self._full(path)
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(target))
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp makes files private; caches are ordinary files
            os.replace(temp, target)
        except BaseException:
            if os.path.exists(temp):
                os.unlink(temp)
            raise

    def delete(self, path: str) -> None:
        full = self._full(path)
        if os.path.exists(full):
            os.unlink(full)

    def stamp(self, path: str) -> str:
        info = os.stat(self._full(path))
        return f"{info.st_size}-{info.st_mtime_ns}"

    def describe(self, path: str) -> str:
        return self._full(path)
