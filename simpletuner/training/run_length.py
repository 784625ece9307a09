"""When the epoch counter ends a run (ignore_final_epochs).

A run ends at its step budget (max_train_steps, or num_train_epochs worth of
steps). It also ends when the data moves into an epoch beyond the ones that
budget needs at the current dataset size. On a run that is never
interrupted the two coincide; they differ when a run is resumed with a
changed dataset or batch size, because the epoch counter comes from the
checkpoint while the epoch length comes from the data now. ignore_final_epochs
turns the epoch limit off, so such a run trains on until its step budget.
"""

from __future__ import annotations

import logging
import math

from simpletuner.config.settings import Settings

logger = logging.getLogger(__name__)


def final_epoch(settings: Settings, total_steps: int, batches_per_epoch: int) -> int | None:
    """The last epoch the run may train in, or None when epochs never end it (ignore_final_epochs)."""
    if settings.ignore_final_epochs:
        return None
    accumulation = int(settings.gradient_accumulation_steps or 1)
    batches_needed = int(total_steps) * accumulation
    return max(1, math.ceil(batches_needed / max(int(batches_per_epoch), 1)))


def past_final_epoch(epoch: int, last_epoch: int | None) -> bool:
    """True (and says so in the log) when a batch of ``epoch`` lies beyond the run's last epoch."""
    if last_epoch is None or epoch <= last_epoch:
        return False
    logger.info("Stopping: epoch %d is past the %d epoch(s) this run's steps need at the current dataset size "
                "(set ignore_final_epochs=true to train on to max_train_steps)", epoch, last_epoch)
    return True
