"""Counters of a run, and how they (with everything else) go into and come out of a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from simpletuner.config.errors import ConfigError
from simpletuner.training import checkpoints

# Settings that must match for a checkpoint to be usable.
IDENTITY_KEYS = ("model_family", "model_flavour", "pretrained_model_name_or_path", "model_type", "lora_type",
                 "lora_rank", "lora_alpha", "peft_lora_target_modules", "use_dora", "lora_init_type")


def config_summary(settings) -> dict:
    return {key: getattr(settings, key) for key in IDENTITY_KEYS}


@dataclass
class RunState:
    global_step: int = 0  # optimizer steps taken
    micro_step: int = 0  # batches consumed (counts gradient-accumulation micro batches)
    epoch: int = 1
    loss_history: list[float] = field(default_factory=list)
    _pending: list[torch.Tensor] = field(default_factory=list)

    def accumulate_loss(self, loss: torch.Tensor, sample_ids: list[str]) -> None:
        self.micro_step += 1
        self._pending.append(loss)

    def pop_step_loss(self) -> float:
        value = torch.stack(self._pending).float().mean().item() if self._pending else float("nan")
        self._pending.clear()
        self.loss_history.append(value)
        return value

    def as_dict(self) -> dict:
        return {"global_step": self.global_step, "micro_step": self.micro_step, "epoch": self.epoch}

    # --- checkpoints -----------------------------------------------------------------------
    def save(self, trainer, rolling: bool = False) -> str:
        module = trainer.accelerator.unwrap_model(trainer.model)
        weights = trainer.trained.state_dict(module)
        state = {
            trainer.trained.checkpoint_key: {k: v.detach().cpu().contiguous() for k, v in weights.items()},
            "optimizer": trainer.optimizer.state_dict(),
            "lr_scheduler": trainer.lr_scheduler.state_dict(),
            "sampler": trainer.data.state_dict(),
            "rng": checkpoints.capture_rng_state(),
            "training_state": self.as_dict(),
        }
        if trainer.ema is not None:
            state["ema"] = trainer.ema.state_dict()
        return checkpoints.save_checkpoint(trainer.settings.output_dir, self.global_step, self.epoch, state,
                                           config_summary(trainer.settings),
                                           use_tempdir=True, rolling=rolling)

    def restore(self, trainer, path: str) -> None:
        state, manifest = checkpoints.load_checkpoint(path)
        differences = checkpoints.config_differences(manifest.get("config", {}), config_summary(trainer.settings))
        if differences:
            raise ConfigError("resume_from_checkpoint",
                              f"The checkpoint {path} was made with a different setup and cannot be resumed: "
                              + "; ".join(differences)
                              + ". Restore those settings, or start fresh with resume_from_checkpoint unset.")
        module = trainer.accelerator.unwrap_model(trainer.model)
        trainer.trained.load_state_dict(module, state[trainer.trained.checkpoint_key])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
        trainer.data.load_state_dict(state["sampler"])
        if trainer.ema is not None and "ema" in state:
            trainer.ema.load_state_dict(state["ema"])
        checkpoints.restore_rng_state(state["rng"])
        counters = state["training_state"]
        self.global_step = counters["global_step"]
        self.micro_step = counters["micro_step"]
        self.epoch = counters["epoch"]
