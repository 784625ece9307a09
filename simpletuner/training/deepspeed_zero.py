"""DeepSpeed ZeRO through accelerate: completing its config from the settings, the optimizer it expects,
and its checkpoints.

DeepSpeed is asked for the accelerate way (``--use_deepspeed --zero_stage N`` in ACCELERATE_EXTRA_ARGS, or
``distributed_type: DEEPSPEED`` with a ``deepspeed_config`` section in an accelerate config file);
accelerate builds the ``DeepSpeedPlugin`` from that. Before ``prepare`` its config is completed here:

* ``train_micro_batch_size_per_gpu`` = train_batch_size (accelerate would read it from a dataloader, and
  batches here do not come through one);
* ``gradient_clipping`` = max_grad_norm (DeepSpeed clips by norm itself, so grad_clip_method must be norm);
* ZeRO-3: ``stage3_gather_16bit_weights_on_model_save`` on, so the final model can be gathered;
* NVMe offload: ``nvme_path`` from offload_param_path.

The optimizer: an ``optimizer`` section in the DeepSpeed config makes DeepSpeed build it (we hand accelerate a
``DummyOptim``, and our lr schedule, or the config's ``scheduler``, runs inside the engine); otherwise our
optimizer is handed to DeepSpeed as a client optimizer and our scheduler keeps stepping its groups.
Checkpoints hold the engine's own files (``engine.save_checkpoint`` on every rank); the final model is
gathered with ``accelerator.get_state_dict``.
"""

from __future__ import annotations

import os

from simpletuner.config.errors import ConfigError
from simpletuner.training import checkpoints, lr_schedules
from simpletuner.training.sharding import DEEPSPEED, REQUEST_KEY, Sharded

ENGINE_FOLDER = "deepspeed"  # inside a checkpoint: the engine's files
ENGINE_TAG = "state"
OFFLOAD_SECTIONS = ("offload_param", "offload_optimizer")


def _offload_device(zero: dict, section: str) -> str:
    return str((zero.get(section) or {}).get("device") or "none").lower()


def _nvme_path(zero: dict, section: str) -> str | None:
    """accelerate writes the string "none" for an unset path."""
    path = (zero.get(section) or {}).get("nvme_path")
    return None if path in (None, "", "none") else path


def config_problems(config: dict, settings) -> list[str]:
    """What in the DeepSpeed config (as accelerate built it) and the settings cannot work together."""
    problems = []
    zero = config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    if stage not in (0, 1, 2, 3):
        problems.append(f"DeepSpeed zero_optimization.stage={stage} is not a ZeRO stage; use 0, 1, 2 or 3.")
    accumulation = config.get("gradient_accumulation_steps", "auto")
    wanted = int(settings.gradient_accumulation_steps or 1)
    if accumulation != "auto" and int(accumulation) != wanted:
        problems.append(f"The DeepSpeed config has gradient_accumulation_steps={accumulation} but "
                        f"gradient_accumulation_steps={wanted}; set them to the same value (or 'auto' in the "
                        "DeepSpeed config).")
    clipping = config.get("gradient_clipping", "auto")
    if clipping == "auto" and settings.max_grad_norm and settings.grad_clip_method == "value":
        problems.append("DeepSpeed clips gradients by norm (its gradient_clipping), not by value; set "
                        "grad_clip_method=norm (max_grad_norm becomes DeepSpeed's gradient_clipping) or "
                        "max_grad_norm=0.")
    if clipping != "auto" and "max_grad_norm" in settings.explicit() and \
            float(clipping) != float(settings.max_grad_norm or 0.0):
        problems.append(f"The DeepSpeed config has gradient_clipping={clipping} but max_grad_norm="
                        f"{settings.max_grad_norm}; keep one of them.")
    if _offload_device(zero, "offload_optimizer") != "none" and "optimizer" not in config:
        problems.append("DeepSpeed offload_optimizer needs DeepSpeed's own optimizer: add an 'optimizer' section "
                        "(e.g. {\"type\": \"AdamW\"}) to the DeepSpeed config, or turn the offload off.")
    if "scheduler" in config and "optimizer" not in config:
        problems.append("A 'scheduler' section in the DeepSpeed config needs an 'optimizer' section as well; add one "
                        "or remove the scheduler (lr_scheduler then decides).")
    nvme = [section for section in OFFLOAD_SECTIONS if _offload_device(zero, section) == "nvme"]
    for section in nvme:
        if not (_nvme_path(zero, section) or settings.offload_param_path):
            problems.append(f"DeepSpeed {section} to nvme needs a folder: set offload_param_path.")
    if settings.offload_param_path and not nvme:
        problems.append("offload_param_path is only used for DeepSpeed NVMe offload (offload_param or "
                        "offload_optimizer with device nvme), which this DeepSpeed config does not use; remove it.")
    return problems


def complete_config(config: dict, settings) -> dict:
    """Fill in what accelerate cannot know here (see the module docstring); changes and returns ``config``."""
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = int(settings.train_batch_size)
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = float(settings.max_grad_norm or 0.0)
    zero = config.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    for section in OFFLOAD_SECTIONS:
        if _offload_device(zero, section) == "nvme" and not _nvme_path(zero, section):
            zero[section]["nvme_path"] = settings.offload_param_path
    return config


class DeepSpeedZero(Sharded):
    kind = DEEPSPEED

    def __init__(self, accelerator, settings):
        super().__init__(accelerator, settings)
        self.config = accelerator.state.deepspeed_plugin.deepspeed_config
        problems = config_problems(self.config, settings)
        if problems:
            raise ConfigError(REQUEST_KEY, " ".join(problems))
        complete_config(self.config, settings)

    def build_optimization(self, groups: list[dict], learning_rate: float, total_steps: int):
        from accelerate.utils.deepspeed import DummyOptim, DummyScheduler

        if "optimizer" not in self.config:
            return super().build_optimization(groups, learning_rate, total_steps)
        optimizer = DummyOptim(groups, lr=learning_rate, weight_decay=float(self.settings.adam_weight_decay or 0.0))
        if "scheduler" in self.config:
            return optimizer, DummyScheduler(optimizer, total_num_steps=total_steps,
                                             warmup_num_steps=int(self.settings.lr_warmup_steps or 0))

        def our_schedule(built_optimizer):
            return lr_schedules.build_lr_scheduler(self.settings, built_optimizer, total_steps, num_processes=1)

        return optimizer, DummyScheduler(optimizer, total_num_steps=total_steps, lr_scheduler_callable=our_schedule)

    def prepare(self, module, optimizer, lr_scheduler):
        from accelerate.utils.deepspeed import DummyOptim

        self._model_class, self._model_config = type(module), getattr(module, "config", None)
        if isinstance(optimizer, DummyOptim):  # DeepSpeed builds both and steps the schedule itself
            return self.accelerator.prepare(module, optimizer, lr_scheduler)
        model, optimizer = self.accelerator.prepare(module, optimizer)
        return model, optimizer, lr_scheduler

    def clip_gradients(self, parameters: list, method: str, limit: float):
        return self.accelerator.clip_grad_norm_(parameters, limit)  # the engine clips; this reads its norm

    def save_weights(self, trained, model, optimizer, folder: str) -> tuple[dict, dict]:
        model.save_checkpoint(os.path.join(folder, ENGINE_FOLDER), tag=ENGINE_TAG)
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return {}, {}
        return {}, {ENGINE_FOLDER: checkpoints.folder_entry(folder, ENGINE_FOLDER)}

    def load_weights(self, trained, model, optimizer, state: dict, path: str) -> None:
        loaded, _ = model.load_checkpoint(os.path.join(path, ENGINE_FOLDER), tag=ENGINE_TAG,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise ConfigError("resume_from_checkpoint", f"DeepSpeed found no engine state in {path}/{ENGINE_FOLDER}; "
                                                        "resume from another checkpoint.")
