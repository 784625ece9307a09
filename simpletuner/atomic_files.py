"""Writing a file so that readers see either the old content or the whole new content, never a part.

The content goes to a temporary file in the target's folder (same filesystem), which then
replaces the target in one rename; if writing fails the temporary file is removed and the
target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


@contextlib.contextmanager
def staged_path(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is deleted."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=folder)
    os.close(handle)
    try:
        yield staging
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def save_safetensors(tensors: dict, path: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file, atomically; tensors are detached, moved to the CPU and made contiguous."""
    from safetensors.torch import save_file

    plain = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    with staged_path(path, suffix=".safetensors") as staging:
        save_file(plain, staging, metadata=metadata)
