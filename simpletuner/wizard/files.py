"""Writing the wizard's files so that an interruption never leaves a partial one.

Every file is first written in full to a temporary file in its own folder, then
all of them are renamed into place with Ctrl-C held back, so either every file
is complete or none was touched. Folders created for an aborted write are
removed again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold Ctrl-C until the block ends, then raise KeyboardInterrupt if one arrived."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _make_folder(folder: str, created: list[str]) -> None:
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for path in reversed(missing):
        os.mkdir(path)
        created.append(path)


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_temporary(path: str, text: str) -> str:
    folder = os.path.dirname(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.chmod(temporary, _file_mode())
    return temporary


def write_files(files: dict[str, str]) -> None:
    """Write every ``path -> text`` pair; all of them land, or none does."""
    created: list[str] = []
    temporaries: dict[str, str] = {}
    done = False
    try:
        for path, text in files.items():
            path = os.path.abspath(path)
            _make_folder(os.path.dirname(path), created)
            temporaries[path] = _write_temporary(path, text)
        with _interrupts_deferred():
            for path, temporary in temporaries.items():
                os.replace(temporary, path)
            done = True
    finally:
        if not done:
            for temporary in temporaries.values():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(temporary)
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
