"""Stop, wait or clean up before a checkpoint is written onto a disk that is nearly full.

Free space on the file system holding ``output_dir`` is compared with
``disk_low_threshold`` when training starts and after every optimizer step,
so no checkpoint (and not the final save) begins below the threshold; the
check is one ``statvfs`` call. ``disk_low_action`` decides what happens when
space is short: ``stop`` ends the run with an error, ``wait`` rechecks every
30 seconds until space appears, ``script`` runs ``disk_low_script`` once and
stops if that fails or frees too little.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import time
from typing import Callable

from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.training.callbacks import Callback

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
WAIT_POLL_S = 30.0


class DiskSpaceLow(ConfigError):
    """Free disk space stayed below disk_low_threshold."""

    def __init__(self, message: str):
        super().__init__("disk_low_threshold", message)


def parse_size(text: str) -> int:
    """Bytes in a size such as ``500K``, ``50M``, ``100G``, ``1T`` (powers of 1024) or a plain byte count."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size; use bytes or a number followed by K, M, G or T (e.g. 100G)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def existing_folder(path: str) -> str:
    """``path`` or its nearest existing parent (output_dir may not be created yet)."""
    path = os.path.abspath(path)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def free_bytes(path: str) -> int:
    return shutil.disk_usage(existing_folder(path)).free


def disk_guard_errors(settings: Settings) -> list[ConfigError]:
    if not settings.disk_low_threshold:
        return []
    try:
        parse_size(settings.disk_low_threshold)
    except ValueError as exc:
        return [ConfigError("disk_low_threshold", f"disk_low_threshold: {exc}.")]
    if settings.disk_low_action == "script" and not settings.disk_low_script:
        return [ConfigError("disk_low_script", "disk_low_action is script but disk_low_script is not set. Set "
                                               "disk_low_script to the cleanup command, or choose disk_low_action "
                                               "stop or wait.")]
    return []


class DiskGuard(Callback):
    def __init__(self, path: str, threshold: str, action: str = "stop", script: str | None = None,
                 measure: Callable[[str], int] = free_bytes, sleep: Callable[[float], None] = time.sleep,
                 poll_s: float = WAIT_POLL_S):
        self.path = path
        self.threshold_text = threshold
        self.threshold = parse_size(threshold)
        self.action = action
        self.script = script
        self.measure = measure
        self.sleep = sleep
        self.poll_s = poll_s

    def on_train_start(self, trainer) -> None:
        if trainer.accelerator.is_main_process:
            self.check()

    def on_step_end(self, trainer, step: int, loss: float) -> None:
        if trainer.accelerator.is_main_process:
            self.check()

    def check(self) -> None:
        free = self.measure(self.path)
        if free >= self.threshold:
            return
        if self.action == "wait":
            self._wait_for_space(free)
        elif self.action == "script":
            self._run_cleanup(free)
        else:
            raise DiskSpaceLow(self._shortage(free) + " Free some space, lower disk_low_threshold, or set "
                                                      "disk_low_action to wait or script.")

    def _shortage(self, free: int) -> str:
        return (f"Only {human_size(free)} free on {existing_folder(self.path)}, below disk_low_threshold="
                f"{self.threshold_text} ({human_size(self.threshold)}); training stopped before the next save.")

    def _wait_for_space(self, free: int) -> None:
        while free < self.threshold:
            logger.warning("Disk space low: %s free on %s, need %s; checking again in %.0f s.",
                           human_size(free), existing_folder(self.path), human_size(self.threshold), self.poll_s)
            self.sleep(self.poll_s)
            free = self.measure(self.path)

    def _run_cleanup(self, free: int) -> None:
        logger.warning("Disk space low (%s free); running disk_low_script: %s", human_size(free), self.script)
        try:
            code = subprocess.run(shlex.split(self.script)).returncode
        except OSError as exc:
            raise DiskSpaceLow(self._shortage(free) + f" disk_low_script {self.script!r} could not be started "
                                                      f"({exc}); check the path and that it is executable.") from None
        if code != 0:
            raise DiskSpaceLow(self._shortage(free) + f" disk_low_script {self.script!r} exited with status {code}.")
        free = self.measure(self.path)
        if free < self.threshold:
            raise DiskSpaceLow(self._shortage(free) + f" disk_low_script {self.script!r} ran but did not free "
                                                      "enough space.")


def disk_guard_callback(settings: Settings) -> DiskGuard | None:
    """Callback factory (see CALLBACK_FACTORIES): None when disk_low_threshold is unset."""
    if not settings.disk_low_threshold:
        return None
    errors = disk_guard_errors(settings)
    if errors:
        raise errors[0]
    return DiskGuard(settings.output_dir, settings.disk_low_threshold, settings.disk_low_action,
                     settings.disk_low_script)
