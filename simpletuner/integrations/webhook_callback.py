"""The training callback that reports start, progress, checkpoints, the end and failures to webhooks.

Events sent (``type`` field of a raw payload):

- ``training.status`` with ``status: "running"``: once at the start, then, when
  ``webhook_reporting_interval`` is set, a progress update at most every that
  many seconds (``global_step``, ``total_steps``, ``percent``, ``loss``,
  ``learning_rate``, ``epoch``).
- ``training.checkpoint``: after each checkpoint (``path``, ``global_step``).
- ``lifecycle.stage`` with ``stage: "training_complete"``: after the final save
  (``output_dir``, ``global_step``).
- ``error`` (severity error): when the run fails, if the trainer reports it.

Only the main process sends.
"""

from __future__ import annotations

import math
import time

from simpletuner.config.settings import Settings
from simpletuner.integrations import webhooks
from simpletuner.integrations.webhook_config import WebhookTarget, load_webhook_targets
from simpletuner.training.callbacks import Callback


class WebhookCallback(Callback):
    def __init__(self, targets: list[WebhookTarget], job: str, interval_s: float | None):
        self.targets = targets
        self.job_id = job
        self.interval_s = interval_s
        self.sender: webhooks.WebhookSender | None = None
        self._last_report = 0.0

    def on_train_start(self, trainer) -> None:
        if not trainer.accelerator.is_main_process:
            return
        self.sender = webhooks.WebhookSender(self.targets, self.job_id)
        webhooks.set_active_sender(self.sender)
        step, total = trainer.state.global_step, trainer.total_steps
        self._last_report = time.monotonic()
        self.sender.send("training.status", f"Training started at step {step} of {total}.",
                         fields={"status": "running", "global_step": step, "total_steps": total})

    def on_step_end(self, trainer, step: int, loss: float) -> None:
        if self.sender is None or self.interval_s is None:
            return
        now = time.monotonic()
        if now - self._last_report < self.interval_s:
            return
        self._last_report = now
        total = trainer.total_steps
        learning_rate = trainer.lr_scheduler.get_last_lr()[0]
        shown_loss = None if math.isnan(loss) else loss
        self.sender.send("training.status", f"Step {step} of {total}, loss {loss:.4f}.",
                         fields={"status": "running", "global_step": step, "total_steps": total,
                                 "percent": round(100.0 * step / max(total, 1), 2), "loss": shown_loss,
                                 "learning_rate": learning_rate, "epoch": trainer.state.epoch})

    def on_checkpoint(self, trainer, path: str, step: int) -> None:
        if self.sender is not None:
            self.sender.send("training.checkpoint", f"Checkpoint saved to {path}",
                             fields={"path": path, "global_step": step})

    def on_train_end(self, trainer, output_dir: str) -> None:
        if self.sender is None:
            return
        self.sender.send("lifecycle.stage", f"Training complete; model saved to {output_dir}.",
                         fields={"stage": "training_complete", "status": "completed", "output_dir": output_dir,
                                 "global_step": trainer.state.global_step})
        self._close()

    def on_error(self, trainer, error: BaseException) -> None:
        if self.sender is None:
            return
        self.sender.send("error", f"Training failed: {error}", severity="error",
                         fields={"title": "Fatal Error", "error_type": type(error).__name__,
                                 "global_step": trainer.state.global_step})
        self._close()

    def _close(self) -> None:
        self.sender.flush()
        webhooks.set_active_sender(None)
        self.sender = None


def webhook_callback(settings: Settings) -> WebhookCallback | None:
    """Callback factory (see CALLBACK_FACTORIES): None when webhook_config is unset."""
    targets = load_webhook_targets(settings.webhook_config)
    if not targets:
        return None
    interval = settings.webhook_reporting_interval
    return WebhookCallback(targets, webhooks.job_id(settings), None if interval is None else float(interval))
