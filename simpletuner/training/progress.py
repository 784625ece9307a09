"""What the user sees during training: a progress bar, and metrics sent to trackers."""

from __future__ import annotations

from tqdm.auto import tqdm

from simpletuner.config.settings import Settings


class TrainingProgress:
    def __init__(self, settings: Settings, accelerator, total_steps: int, start_step: int):
        self.accelerator = accelerator
        self.bar = tqdm(total=total_steps, initial=start_step, desc="Training", unit="step",
                        disable=not accelerator.is_main_process, dynamic_ncols=True)

    def step(self, global_step: int, loss: float, lr: float, epoch: int) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", epoch=epoch, refresh=False)
        self.accelerator.log({"train_loss": loss, "learning_rate": lr, "epoch": epoch}, step=global_step)

    def close(self) -> None:
        self.bar.close()
