"""What the user sees during training: a progress bar, and metrics sent to trackers."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from simpletuner.config.settings import Settings


class TrainingProgress:
    def __init__(self, settings: Settings, accelerator, total_steps: int, start_step: int):
        self.accelerator = accelerator
        self.last_step_at = time.perf_counter()
        self.bar = tqdm(total=total_steps, initial=start_step, desc="Training", unit="step",
                        disable=not accelerator.is_main_process, dynamic_ncols=True)

    def step(self, global_step: int, loss: float, lr: float, epoch: int, grad_norm=None) -> None:
        now = time.perf_counter()
        metrics = {"train_loss": loss, "learning_rate": lr, "epoch": epoch, "step_time": now - self.last_step_at}
        self.last_step_at = now
        if grad_norm is not None:  # the norm before clipping, when max_grad_norm clips by norm
            metrics["grad_norm"] = float(grad_norm)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", epoch=epoch, refresh=False)
        self.accelerator.log(metrics, step=global_step)

    def close(self) -> None:
        self.bar.close()
