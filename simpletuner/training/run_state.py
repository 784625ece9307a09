"""Counters of a run, and how they (with everything else) go into and come out of a checkpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from simpletuner.config.errors import ConfigError
from simpletuner.training import checkpoints

logger = logging.getLogger("simpletuner.checkpoints")

# Settings that must match for a checkpoint to be usable.
IDENTITY_KEYS = ("model_family", "model_flavour", "pretrained_model_name_or_path", "model_type", "lora_type",
                 "lora_rank", "lora_alpha", "peft_lora_target_modules", "use_dora", "lora_init_type")


def config_summary(settings, sharding: str | None = None) -> dict:
    """What must match between a checkpoint and the run resuming it; ``sharding`` is "FSDP", "DeepSpeed" or None
    (their checkpoints hold weights and optimizer state in their own formats)."""
    summary = {key: getattr(settings, key) for key in IDENTITY_KEYS}
    if sharding is not None:  # absent for plain data parallelism, as in checkpoints written before sharding
        summary["sharding"] = sharding
    return summary


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
    def save(self, trainer, rolling: bool = False) -> str | None:
        """Called on every rank: each writes its own RNG state (and, when the model is sharded, its shard) into
        one work folder; rank 0 writes the rest and the manifest, and gets the checkpoint path (others None)."""
        accelerator = trainer.accelerator
        folder = _shared_work_folder(accelerator, trainer.settings.output_dir, self.global_step, rolling)
        state, written = trainer.sharded.save_weights(trainer.trained, trainer.model, trainer.optimizer, folder)
        written.update(checkpoints.write_state_files(folder, {rng_stem(accelerator.process_index):
                                                              checkpoints.capture_rng_state()}))
        written = _merged_across_ranks(accelerator, written)
        if not accelerator.is_main_process:
            return None
        state.update({
            "lr_scheduler": trainer.lr_scheduler.state_dict(),
            "sampler": trainer.data.state_dict(),
            "training_state": self.as_dict(),
        })
        if trainer.ema is not None:
            state["ema"] = trainer.ema.state_dict()
        return checkpoints.save_checkpoint(trainer.settings.output_dir, self.global_step, self.epoch, state,
                                           config_summary(trainer.settings, trainer.sharded.kind),
                                           rolling=rolling, work_folder=folder, written=written)

    def restore(self, trainer, path: str) -> None:
        """Called on every rank; each restores its own RNG state."""
        state, manifest = checkpoints.load_checkpoint(path)
        current = config_summary(trainer.settings, trainer.sharded.kind)
        differences = checkpoints.config_differences(manifest.get("config", {}), current)
        if differences:
            raise ConfigError("resume_from_checkpoint",
                              f"The checkpoint {path} was made with a different setup and cannot be resumed: "
                              + "; ".join(differences)
                              + ". Restore those settings, or start fresh with resume_from_checkpoint unset.")
        trainer.sharded.load_weights(trainer.trained, trainer.model, trainer.optimizer, state, path)
        trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
        trainer.data.load_state_dict(state["sampler"])
        if trainer.ema is not None and "ema" in state:
            trainer.ema.load_state_dict(state["ema"])
        restore_rank_rng(state, trainer.accelerator.process_index)
        counters = state["training_state"]
        self.global_step = counters["global_step"]
        self.micro_step = counters["micro_step"]
        self.epoch = counters["epoch"]


def rng_stem(rank: int) -> str:
    return f"rng-rank{rank}"


def restore_rank_rng(state: dict, rank: int) -> None:
    """This rank's generators as it saved them. Checkpoints from before per-rank states hold rank 0's ("rng");
    a rank the checkpoint has no state for (the run now has more processes) keeps its seeded generators."""
    own = state.get(rng_stem(rank), state.get("rng"))
    if own is None:
        logger.warning("rank %d: the checkpoint holds no random state for this rank (it was saved by fewer "
                       "processes); this rank continues from its seeded random state", rank)
        return
    checkpoints.restore_rng_state(own)


def _shared_work_folder(accelerator, output_dir: str, step: int, rolling: bool) -> str:
    """Rank 0 makes the hidden folder the checkpoint is built in and tells the other ranks its name."""
    name = [checkpoints.new_work_folder(output_dir, step, rolling) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(name, from_process=0)
    return name[0]


def _merged_across_ranks(accelerator, written: dict) -> dict:
    """Every rank's manifest entries, collected on all ranks (after which every rank's files are complete)."""
    if accelerator.num_processes == 1:
        return written
    from accelerate.utils import gather_object

    merged: dict = {}
    for part in gather_object([written]):
        merged.update(part)
    return merged
