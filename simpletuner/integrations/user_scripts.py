"""Running the user's hook commands (post_checkpoint_script) with training context filled in.

A command is split shell-style first, then each word has its ``{placeholder}``
fields filled, so a checkpoint path with spaces stays one argument. Unknown
placeholders become empty strings. Commands run in the background; the run
waits for them before it ends and logs a non-zero exit status.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import string
import subprocess

from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.training.callbacks import Callback

logger = logging.getLogger(__name__)


class _EmptyForMissing(dict):
    def __missing__(self, key: str) -> str:
        return ""


def script_placeholders(settings: Settings, local_checkpoint_path: str = "", global_step: int | str = "",
                        remote_checkpoint_path: str = "") -> dict[str, object]:
    """Values for a hook command's placeholders: run identity, model, every validation_* option."""
    from simpletuner.config.options import OPTIONS

    values: dict[str, object] = {name: getattr(settings, name) for name in OPTIONS if name.startswith("validation_")}
    values.update({
        "local_checkpoint_path": local_checkpoint_path,
        "global_step": global_step,
        "remote_checkpoint_path": remote_checkpoint_path,
        "tracker_run_name": settings.tracker_run_name,
        "tracker_project_name": settings.tracker_project_name,
        "model_family": settings.model_family,
        "model_type": settings.model_type,
        "lora_type": settings.lora_type,
        "huggingface_path": settings.hub_model_id,
    })
    return {key: "" if value is None else value for key, value in values.items()}


def command_words(template: str, placeholders: dict[str, object]) -> list[str]:
    formatter = string.Formatter()
    values = _EmptyForMissing(placeholders)
    return [formatter.vformat(word, (), values) for word in shlex.split(template)]


def script_errors(settings: Settings, option: str) -> list[ConfigError]:
    """Problems with a hook command: unbalanced quotes, bad placeholders, a program that cannot be found."""
    template = getattr(settings, option)
    if not template:
        return []
    sample = script_placeholders(settings, local_checkpoint_path="checkpoint-1", global_step=1)
    try:
        words = command_words(template, sample)
    except (ValueError, IndexError, AttributeError) as exc:
        return [ConfigError(option, f"{option}: cannot read the command {template!r} ({exc}). Check its quoting "
                                    f"and {{placeholder}} braces.")]
    if not words or shutil.which(words[0]) is None:
        program = words[0] if words else ""
        return [ConfigError(option, f"{option}: the program {program!r} in {template!r} was not found or is not "
                                    f"executable. Give a full path to an executable script (chmod +x) or a "
                                    f"command on PATH.")]
    return []


class ScriptRunner:
    """Starts commands in the background and remembers them until they finish."""

    def __init__(self, option: str):
        self.option = option
        self.running: list[tuple[list[str], subprocess.Popen]] = []

    def start(self, words: list[str]) -> None:
        try:
            process = subprocess.Popen(words)
        except OSError as exc:
            logger.warning("%s: could not start %s: %s", self.option, words, exc)
            return
        self.running.append((words, process))
        self._reap(block=False)

    def wait_all(self) -> None:
        self._reap(block=True)

    def _reap(self, block: bool) -> None:
        still_running = []
        for words, process in self.running:
            code = process.wait() if block else process.poll()
            if code is None:
                still_running.append((words, process))
            elif code != 0:
                logger.warning("%s exited with status %d: %s", self.option, code, shlex.join(words))
        self.running = still_running


class PostCheckpointScript(Callback):
    def __init__(self, settings: Settings):
        self.settings = settings
        self.runner = ScriptRunner("post_checkpoint_script")

    def on_checkpoint(self, trainer, path: str, step: int) -> None:
        values = script_placeholders(self.settings, local_checkpoint_path=path, global_step=step)
        words = command_words(self.settings.post_checkpoint_script, values)
        logger.info("Running post_checkpoint_script: %s", shlex.join(words))
        self.runner.start(words)

    def on_train_end(self, trainer, output_dir: str) -> None:
        self.runner.wait_all()


def post_checkpoint_callback(settings: Settings) -> PostCheckpointScript | None:
    """Callback factory (see CALLBACK_FACTORIES): None when post_checkpoint_script is unset."""
    if not settings.post_checkpoint_script:
        return None
    errors = script_errors(settings, "post_checkpoint_script")
    if errors:
        raise errors[0]
    return PostCheckpointScript(settings)
