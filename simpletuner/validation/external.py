"""validation_method=external-script: at each validation time, run the user's command instead of rendering.

The command (validation_external_script) is split shell-style and its
``{placeholders}`` filled like the other hook commands: the newest checkpoint
folder (``{local_checkpoint_path}``), ``{global_step}``, run and model
identity, and every ``validation_*`` value. It runs on the main process, on
the validation schedule (steps, epochs, startup, end of training). By default
training waits for it and logs a non-zero exit status; with
validation_external_background it is started and left running (its exit
status is not checked).
"""

from __future__ import annotations

import logging
import shlex
import subprocess

from simpletuner.config.errors import ConfigError
from simpletuner.integrations.user_scripts import ScriptRunner, command_words, script_errors, script_placeholders
from simpletuner.training.callbacks import Callback
from simpletuner.training.checkpoints import find_latest_checkpoint
from simpletuner.validation.schedule import Schedule

logger = logging.getLogger("simpletuner.validation")

OPTION = "validation_external_script"
CHECKPOINT_PLACEHOLDER = "{local_checkpoint_path}"


def external_script_errors(settings) -> list[ConfigError]:
    if not settings.validation_external_script:
        return [ConfigError(OPTION, "validation_method=external-script needs validation_external_script: the "
                                    "command to run, e.g. \"/opt/validate.sh {local_checkpoint_path} "
                                    "{global_step}\".")]
    return script_errors(settings, OPTION)


class ExternalValidation(Callback):
    def __init__(self, settings):
        self.settings = settings
        self.schedule = Schedule(settings)
        self.background = bool(settings.validation_external_background)
        self.runner = ScriptRunner(OPTION)
        self.last_step: int | None = None

    def on_train_start(self, trainer) -> None:
        if self.settings.validation_on_startup and trainer.accelerator.is_main_process:
            self.run_script(trainer.state.global_step)

    def on_step_end(self, trainer, step: int, loss: float) -> None:
        if self.schedule.validation_at_step(step) and trainer.accelerator.is_main_process:
            self.run_script(step)

    def on_epoch_end(self, trainer, epoch: int) -> None:
        if self.schedule.validation_at_epoch_end(epoch) and trainer.accelerator.is_main_process:
            self.run_script(trainer.state.global_step)

    def on_train_end(self, trainer, output_dir: str) -> None:
        """Main process only: a last run for the final weights (a background one is left running)."""
        self.run_script(trainer.state.global_step)

    def run_script(self, step: int) -> None:
        """Run the command for ``step`` once (waits for it unless validation_external_background)."""
        if self.last_step == step:
            return
        self.last_step = step
        template = self.settings.validation_external_script
        checkpoint = find_latest_checkpoint(self.settings.output_dir) or ""
        if not checkpoint and CHECKPOINT_PLACEHOLDER in template:
            logger.warning("%s skipped at step %d: it needs %s and no checkpoint exists yet in %s.", OPTION, step,
                           CHECKPOINT_PLACEHOLDER, self.settings.output_dir)
            return
        values = script_placeholders(self.settings, local_checkpoint_path=checkpoint, global_step=step)
        words = command_words(template, values)
        logger.info("External validation at step %d: %s", step, shlex.join(words))
        if self.background:
            self.runner.start(words)
            return
        try:
            code = subprocess.run(words, check=False).returncode
        except OSError as exc:
            logger.error("%s could not start %s: %s", OPTION, shlex.join(words), exc)
            return
        if code != 0:
            logger.error("%s exited with status %d at step %d: %s", OPTION, code, step, shlex.join(words))
