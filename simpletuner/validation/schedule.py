"""When validation rounds and evaluation rounds are due.

Validation: every ``validation_step_interval`` optimizer steps and at the end
of every ``validation_epoch_interval``-th epoch.

Evaluation (eval loss and CLIP scores): every ``eval_steps_interval`` steps
and every ``eval_epoch_interval`` epochs, which may be a fraction (0.5 runs
twice per epoch; the point is measured in optimizer steps). With neither set,
evaluation runs with every validation round.
"""

from __future__ import annotations

import logging
import math

logger = logging.getLogger(__name__)


def _every(step: int, interval) -> bool:
    return bool(interval) and int(interval) > 0 and step % int(interval) == 0


class Schedule:
    def __init__(self, settings):
        self.validation_steps = settings.validation_step_interval
        self.validation_epochs = settings.validation_epoch_interval
        self.eval_steps = settings.eval_steps_interval
        self.eval_epochs = float(settings.eval_epoch_interval) if settings.eval_epoch_interval else None
        if self.eval_epochs is not None and self.eval_epochs <= 0:
            from simpletuner.config.errors import ConfigError

            raise ConfigError("eval_epoch_interval", f"eval_epoch_interval={settings.eval_epoch_interval} must be "
                                                     "above 0 (e.g. 1, or 0.5 for twice per epoch).")
        if self.eval_steps and self.eval_epochs:
            logger.warning("eval_steps_interval and eval_epoch_interval are both set; evaluation runs on both "
                           "schedules.")

    @property
    def eval_follows_validation(self) -> bool:
        return not self.eval_steps and not self.eval_epochs

    def validation_at_step(self, step: int) -> bool:
        return _every(step, self.validation_steps)

    def validation_at_epoch_end(self, epoch: int) -> bool:
        return _every(epoch, self.validation_epochs)

    def eval_at_step(self, step: int, steps_per_epoch: int) -> bool:
        """Evaluation on its own schedule after optimizer step ``step`` (steps_per_epoch in optimizer steps)."""
        if _every(step, self.eval_steps):
            return True
        if not self.eval_epochs or steps_per_epoch <= 0:
            return False
        period = self.eval_epochs * steps_per_epoch  # optimizer steps between evaluations
        return math.floor(step / period + 1e-9) > math.floor((step - 1) / period + 1e-9)
