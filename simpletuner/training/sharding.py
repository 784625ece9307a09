"""FSDP2 and DeepSpeed: asking for them, refusing what cannot run, and handling their sharded state.

Under plain data parallelism every rank holds the whole model, so rank 0's copy is what a checkpoint and
the final model hold. Under FSDP2 (and DeepSpeed ZeRO) each rank holds only a shard, so:

* checkpoints: every rank writes its part of the weights and optimizer state into the checkpoint folder
  (FSDP: accelerate's ``save_fsdp_model`` / ``save_fsdp_optimizer``, in the ``fsdp_state_dict_type`` format;
  DeepSpeed: the engine's own ``save_checkpoint``, see deepspeed_zero.py);
* the final model: every rank takes part in gathering the full state dict (``accelerator.get_state_dict``)
  and rank 0 loads it into a plain instance of the model class, which is saved in diffusers layout.

FSDP2 also runs on a machine without GPUs (over gloo), see ``_let_fsdp_run_over_gloo``.

``create_accelerator`` builds the Accelerator in the requested mode; ``strategy_for`` returns the object the
trainer asks for the optimizer, ``prepare``, gradient clipping, checkpoint weights and the model to save.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Mapping

import torch

from simpletuner.config.errors import ConfigError
from simpletuner.training import checkpoints, lr_schedules, optimizers
from simpletuner.training.distributed import world_size_from_environment

logger = logging.getLogger("simpletuner.sharding")

FSDP, DEEPSPEED = "FSDP", "DeepSpeed"
# accelerate's DistributedType name -> ours
DISTRIBUTED_TYPES = {"FSDP": FSDP, "DEEPSPEED": DEEPSPEED}
REQUEST_KEY = "ACCELERATE_EXTRA_ARGS"  # where sharding is usually asked for; errors name it
BOTH_REQUESTED = ("FSDP and DeepSpeed cannot be enabled simultaneously. Remove the DeepSpeed settings "
                  "(--use_deepspeed, distributed_type: DEEPSPEED) or disable FSDP (fsdp_enable, --use_fsdp).")
FSDP_FOLDER = "fsdp"  # inside a checkpoint: accelerate's FSDP model + optimizer files
# Settings whose state is not sharded (nor gathered) yet: option -> what to do instead.
UNSHARDED_FEATURES = {
    "use_ema": "the EMA copy is neither sharded nor gathered; set use_ema=false",
    "train_text_encoder": "only the denoiser is sharded; set train_text_encoder=false",
    "controlnet": "ControlNet training keeps the whole model per rank; set controlnet=false",
    "optimizer_release_gradients": "its per-parameter hooks do not see FSDP's sharded gradients; set "
                                   "optimizer_release_gradients=false",
    "offload_during_save": "a sharded model cannot be moved to the CPU and back on rank 0 alone; set "
                           "offload_during_save=false",
}
# Optimizers known to fail on FSDP's DTensor parameters.
DTENSOR_INCOMPATIBLE_OPTIMIZERS = {"soap": "its preconditioner mixes plain tensors with DTensors"}


# --- what was asked for, and whether it can run ---------------------------------------------------
def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").lower() in ("1", "true", "yes")


def requested_kind(settings, environ: Mapping[str, str] = os.environ) -> str | None:
    """FSDP / DeepSpeed as asked for inside a started process: fsdp_enable, or what accelerate launch set up
    from its flags or config file (ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED)."""
    fsdp = bool(settings.fsdp_enable) or _flag(environ, "ACCELERATE_USE_FSDP")
    deepspeed = _flag(environ, "ACCELERATE_USE_DEEPSPEED")
    if fsdp and deepspeed:
        raise ConfigError("fsdp_enable", BOTH_REQUESTED)
    return FSDP if fsdp else DEEPSPEED if deepspeed else None


def sharding_problems(kind: str, settings, cuda: bool | None = None,
                      deepspeed_installed: bool | None = None) -> list[str]:
    """Why an FSDP / DeepSpeed run cannot go ahead with these settings on this machine (empty when it can)."""
    import importlib.util

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if deepspeed_installed is None:
        deepspeed_installed = importlib.util.find_spec("deepspeed") is not None
    problems = []
    if kind == DEEPSPEED:
        if not deepspeed_installed:
            problems.append("DeepSpeed was requested but the deepspeed package is not installed; install it on a "
                            "CUDA machine (pip install deepspeed).")
        if not cuda:
            problems.append("DeepSpeed needs NVIDIA GPUs and this machine has no CUDA device. Remove the DeepSpeed "
                            "settings from ACCELERATE_EXTRA_ARGS / the accelerate config to train with plain data "
                            "parallelism, or use FSDP (fsdp_enable=true).")
    if settings.model_type != "full":
        switches = "fsdp_enable / --use_fsdp" if kind == FSDP else "--use_deepspeed"
        problems.append(f"{kind} shards a full model (model_type=full); model_type={settings.model_type} runs are "
                        f"not sharded. Set model_type=full, or drop {switches} (and distributed_type in the "
                        "accelerate config) to train the adapter with plain data parallelism (num_processes).")
    for name, instead in UNSHARDED_FEATURES.items():
        if getattr(settings, name):
            problems.append(f"{name} is not implemented with {kind} yet: {instead}.")
    if kind == FSDP and settings.optimizer in DTENSOR_INCOMPATIBLE_OPTIMIZERS:
        problems.append(f"optimizer={settings.optimizer} does not work on FSDP's sharded parameters "
                        f"({DTENSOR_INCOMPATIBLE_OPTIMIZERS[settings.optimizer]}); choose adamw_bf16 or optimi-adamw.")
    return problems


def refuse_unsupported(kind: str | None, settings, environ: Mapping[str, str] = os.environ) -> None:
    if kind is None:
        return
    problems = sharding_problems(kind, settings)
    if world_size_from_environment(environ) < 2:
        problems.append(f"{kind} shards the model across processes and this run has one; set num_processes to 2 "
                        "or more (or launch with accelerate launch --num_processes N).")
    if problems:
        raise ConfigError("fsdp_enable" if kind == FSDP and settings.fsdp_enable else REQUEST_KEY, " ".join(problems))


# --- the accelerator ------------------------------------------------------------------------------
def fsdp_plugin(settings):
    """accelerate's FSDP plugin: the fsdp_* options with fsdp_enable (their defaults included); otherwise the
    ones set explicitly, leaving the rest to what accelerate launch set up from its flags or config file."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    chosen = settings.explicit()

    def value(name: str):
        return getattr(settings, name) if settings.fsdp_enable or name in chosen else None

    layer_classes = value("fsdp_transformer_layer_cls_to_wrap")
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=value("fsdp_version"),
        reshard_after_forward=value("fsdp_reshard_after_forward"),
        state_dict_type=value("fsdp_state_dict_type"),
        auto_wrap_policy=value("fsdp_auto_wrap_policy"),
        transformer_cls_names_to_wrap=[name.strip() for name in layer_classes.split(",") if name.strip()]
        if layer_classes else None,
    )
    if plugin.fsdp_version != 2:
        raise ConfigError("fsdp_version", f"FSDP version {plugin.fsdp_version} was requested; FSDP v1 is deprecated "
                                          "and only FSDP2 is built. Set fsdp_version=2 (--fsdp_version 2 in "
                                          "ACCELERATE_EXTRA_ARGS, fsdp_version: 2 in the accelerate config).")
    return plugin


def _let_fsdp_run_over_gloo() -> None:
    """accelerate turns FSDP on only for GPU-type process groups, yet torch's fully_shard runs over gloo on the
    CPU as well. A CPU multi-process state is therefore shown to accelerate as a GPU-type one (its device stays
    the CPU and its backend gloo), so a machine without GPUs runs (and tests) the same FSDP2 path. It has to
    stay that way for the run: accelerate copies the process state into its AcceleratorState again and again."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = PartialState()
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.MULTI_GPU


def create_accelerator(settings, environ: Mapping[str, str] = os.environ, **accelerator_kwargs):
    """accelerate's Accelerator in the requested mode, after refusing a mode these settings cannot run in."""
    from accelerate import Accelerator

    kind = requested_kind(settings, environ)
    refuse_unsupported(kind, settings, environ)
    if kind == FSDP:
        accelerator_kwargs["fsdp_plugin"] = fsdp_plugin(settings)
        _let_fsdp_run_over_gloo()
    accelerator = Accelerator(**accelerator_kwargs)
    started = DISTRIBUTED_TYPES.get(str(accelerator.distributed_type).split(".")[-1])
    if started != kind:
        raise ConfigError(REQUEST_KEY, f"{kind} was requested but accelerate started "
                                       f"{started or 'plain data parallelism'} ({accelerator.distributed_type}); "
                                       "check the accelerate config file and ACCELERATE_EXTRA_ARGS.")
    return accelerator


def strategy_for(accelerator, settings) -> "DataParallel":
    kind = DISTRIBUTED_TYPES.get(str(accelerator.distributed_type).split(".")[-1])
    if kind == FSDP:
        plugin = accelerator.state.fsdp_plugin
        logger.info("FSDP2: the model is sharded across %d processes (checkpoints as %s, reshard after forward: %s)",
                    accelerator.num_processes, plugin.state_dict_type.name, plugin.reshard_after_forward)
        return Fsdp2(accelerator, settings)
    if kind == DEEPSPEED:
        from simpletuner.training.deepspeed_zero import DeepSpeedZero

        return DeepSpeedZero(accelerator, settings)
    return DataParallel(accelerator, settings)


# --- strategies -----------------------------------------------------------------------------------
class DataParallel:
    """Every rank holds the whole model: rank 0's copy goes into checkpoints and the final output."""

    kind: str | None = None

    def __init__(self, accelerator, settings):
        self.accelerator, self.settings = accelerator, settings
        self._model_class, self._model_config = None, None

    def build_optimization(self, groups: list[dict], learning_rate: float, total_steps: int):
        """(optimizer, lr scheduler); the scheduler counts optimizer steps and is stepped by the trainer."""
        optimizer = optimizers.build_optimizer(self.settings.replace(learning_rate=learning_rate), groups)
        return optimizer, lr_schedules.build_lr_scheduler(self.settings, optimizer, total_steps, num_processes=1)

    def prepare(self, module: torch.nn.Module, optimizer, lr_scheduler):
        self._model_class, self._model_config = type(module), getattr(module, "config", None)
        model, optimizer = self.accelerator.prepare(module, optimizer)
        return model, optimizer, lr_scheduler

    def trainable_parameters(self, model, parameters: list) -> list:
        return parameters

    def clip_gradients(self, parameters: list, method: str, limit: float):
        """Clip; returns the norm before clipping when clipping by norm."""
        if method == "value":
            self.accelerator.clip_grad_value_(parameters, limit)
            return None
        return self.accelerator.clip_grad_norm_(parameters, limit)

    def check_callbacks(self, callbacks, trainer) -> None:
        """Refuse side jobs that run the model on rank 0 alone when the model is sharded."""

    # checkpoints ----------------------------------------------------------------------------
    def save_weights(self, trained, model, optimizer, folder: str) -> tuple[dict, dict]:
        """Every rank: (entries for rank 0's checkpoint state, manifest entries of files written into folder)."""
        if not self.accelerator.is_main_process:
            return {}, {}
        weights = trained.state_dict(self.accelerator.unwrap_model(model))
        return {trained.checkpoint_key: {k: v.detach().cpu().contiguous() for k, v in weights.items()},
                "optimizer": optimizer.state_dict()}, {}

    def load_weights(self, trained, model, optimizer, state: dict, path: str) -> None:
        """Every rank."""
        trained.load_state_dict(self.accelerator.unwrap_model(model), state[trained.checkpoint_key])
        optimizer.load_state_dict(state["optimizer"])

    def module_for_saving(self, model):
        """Every rank takes part; rank 0 gets the module whose weights are written out (others may get None)."""
        return self.accelerator.unwrap_model(model)


class Sharded(DataParallel):
    """What FSDP and DeepSpeed have in common: no rank holds the whole model."""

    def check_callbacks(self, callbacks, trainer) -> None:
        problems = rank0_forward_problems(callbacks, trainer)
        if problems:
            raise ConfigError("validation_disable", f"Under {self.kind} every rank holds a shard of the model, but "
                                                    "validation runs the model on rank 0 alone, which would wait "
                                                    "forever for the other ranks: " + " ".join(problems))

    def module_for_saving(self, model):
        state = self.accelerator.get_state_dict(model)  # a collective: the whole state dict lands on rank 0
        if not self.accelerator.is_main_process:
            return None
        return plain_copy(self._model_class, self._model_config, state)


class Fsdp2(Sharded):
    """FSDP2 (``fully_shard`` through accelerate): parameters, gradients and optimizer state are sharded."""

    kind = FSDP

    def prepare(self, module: torch.nn.Module, optimizer, lr_scheduler):
        wanted = self.accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap or []
        present = {type(child).__name__ for child in module.modules()}
        missing = [name for name in wanted if name not in present]
        if missing:
            raise ConfigError("fsdp_transformer_layer_cls_to_wrap",
                              f"fsdp_transformer_layer_cls_to_wrap names {', '.join(missing)}, which "
                              f"{type(module).__name__} does not contain; its block classes include "
                              f"{', '.join(sorted(name for name in present if 'Block' in name)) or 'none'}.")
        return super().prepare(module, optimizer, lr_scheduler)

    def trainable_parameters(self, model, parameters: list) -> list:
        # fully_shard replaces every parameter with a DTensor one; the list gathered before prepare is stale.
        return [parameter for parameter in model.parameters() if parameter.requires_grad]

    def clip_gradients(self, parameters: list, method: str, limit: float):
        if method == "value":
            # accelerate refuses clip_grad_value_ under FSDP; clamping is element-wise, so clamping each rank's
            # shard of the averaged gradient is exactly clamping the whole gradient.
            self.accelerator.unscale_gradients()
            torch.nn.utils.clip_grad_value_(parameters, limit)
            return None
        norm = self.accelerator.clip_grad_norm_(parameters, limit)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def save_weights(self, trained, model, optimizer, folder: str) -> tuple[dict, dict]:
        from accelerate.utils import save_fsdp_model, save_fsdp_optimizer

        target = os.path.join(folder, FSDP_FOLDER)
        plugin = self.accelerator.state.fsdp_plugin
        save_fsdp_model(plugin, self.accelerator, model, target)
        save_fsdp_optimizer(plugin, self.accelerator, optimizer, model, target)
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return {}, {}
        return {}, {FSDP_FOLDER: checkpoints.folder_entry(folder, FSDP_FOLDER)}

    def load_weights(self, trained, model, optimizer, state: dict, path: str) -> None:
        from accelerate.utils import load_fsdp_model, load_fsdp_optimizer

        source = os.path.join(path, FSDP_FOLDER)
        plugin = self._plugin_for(source)
        load_fsdp_model(plugin, self.accelerator, model, source)
        load_fsdp_optimizer(plugin, self.accelerator, optimizer, model, source)

    def _plugin_for(self, source: str):
        """The plugin, switched to the state dict type the checkpoint was written in (its files tell)."""
        from accelerate.utils.constants import FSDP_MODEL_NAME
        from torch.distributed.fsdp import StateDictType

        plugin = self.accelerator.state.fsdp_plugin
        saved = (StateDictType.FULL_STATE_DICT if os.path.isfile(os.path.join(source, f"{FSDP_MODEL_NAME}.bin"))
                 else StateDictType.SHARDED_STATE_DICT)
        if saved == plugin.state_dict_type:
            return plugin
        logger.info("The checkpoint holds a %s; loading it as such", saved.name)
        switched = copy.copy(plugin)
        switched.state_dict_config = switched.optim_state_dict_config = None
        switched.set_state_dict_type(saved)
        return switched


def plain_copy(model_class: type, config, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An ordinary (unsharded) instance of ``model_class`` holding ``state``, built without a second copy of
    the weights in memory: parameters start empty and take the gathered tensors."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = model_class.from_config(config)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def rank0_forward_problems(callbacks, trainer) -> list[str]:
    """The validation work that would run the (sharded) model on rank 0 alone, each with its fix."""
    from simpletuner.validation.callback import ValidationCallback
    from simpletuner.validation.eval_loss import eval_specs

    settings = trainer.settings
    problems = []
    for callback in callbacks.callbacks:
        if not isinstance(callback, ValidationCallback):
            continue
        if callback.renders:
            problems.append("validation images are rendered (set validation_disable=true).")
        if not settings.eval_loss_disable and eval_specs(trainer.data):
            problems.append("eval loss is computed on the eval datasets (set eval_loss_disable=true).")
        if settings.evaluation_type == "clip":
            problems.append("CLIP scores are computed (set evaluation_type=none).")
    return problems
