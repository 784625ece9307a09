"""The training recipe: setup -> loop -> finish.

The trainer wires the parts together and owns the loop; the parts (family,
data pipeline, adapters, optimizer, checkpoints, outputs) do the work.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch

from simpletuner.config.settings import Settings
from simpletuner.training import (checkpoints, compilation, distributed, lr_schedules, model_file_cleanup,
                                  optimizers, run_length, sharding, unloading)
from simpletuner.training.accelerator import build_accelerator, weight_dtype_for
from simpletuner.training.callbacks import build_callbacks
from simpletuner.training.loss_step import LossStep
from simpletuner.training.model_setup import prepare_components
from simpletuner.training.outputs import save_outputs
from simpletuner.training.progress import TrainingProgress
from simpletuner.training.run_state import RunState
from simpletuner.training.save_offload import offloaded_during_save
from simpletuner.training.trainable import make_trainable

logger = logging.getLogger("simpletuner.trainer")


class Trainer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.state = RunState()

    def run(self) -> RunState:
        self.setup_accelerator()
        self.callbacks = None
        with self.watchdog:  # multi-process runs: stop, naming the rank, when another rank is lost
            try:
                for step in (self.setup_model, self.setup_data, self.setup_trainable, self.setup_optimization,
                             self.resume_if_requested, self.setup_callbacks, self.train, self.finish):
                    self.watchdog.enter(step.__name__)
                    step()
            except BaseException as error:
                if self.callbacks is not None:  # e.g. webhooks report the failure
                    self.callbacks.on_error(self, error)
                raise
        return self.state

    # --- setup -------------------------------------------------------------------------
    def setup_accelerator(self) -> None:
        distributed.init_process_state()
        self.accelerator = build_accelerator(self.settings)
        self.sharded = sharding.strategy_for(self.accelerator, self.settings)  # plain, FSDP2 or DeepSpeed
        compilation.disable_accelerate_compile(self.accelerator)  # compile_denoiser does it, in place
        self.device = self.accelerator.device
        self.weight_dtype = weight_dtype_for(self.settings)
        self.watchdog = distributed.start_watchdog(self.accelerator, self.settings)
        self.sample_log = distributed.SampleIdLog.for_run(self.settings, self.accelerator.process_index)

    def setup_model(self) -> None:
        from simpletuner.models.registry import get_family

        family_class = get_family(self.settings.model_family, self.settings)
        self.family = family_class(self.settings)
        self.components = self.family.load(self.device, self.weight_dtype)
        prepare_components(self.family, self.components, self.settings, self.device)
        model_file_cleanup.delete_denoiser_files(self)  # delete_model_after_load

    def setup_data(self) -> None:
        from simpletuner.data.pipeline import prepare_data

        self.data = prepare_data(self.settings, family=self.family, rank=self.accelerator.process_index,
                                 world_size=self.accelerator.num_processes, progress=self.accelerator.is_main_process)
        distributed.log_cache_work(self.data, self.accelerator.process_index)
        vae = self.components.vae  # None for pixel-space families
        if vae is not None and not self.settings.keep_vae_loaded and not self.data.needs_vae_for_batches:
            vae.to("cpu")
        model_file_cleanup.delete_encoder_files(self)  # delete_model_after_load
        self.text_encoder_unloader = unloading.unload_after_caching(self)  # fully_unload_text_encoder

    def setup_trainable(self) -> None:
        self.trained = make_trainable(self.family, self.settings)
        self.trained.attach()
        if self.settings.gradient_checkpointing and hasattr(self.trained.module, "enable_gradient_checkpointing"):
            self.trained.module.enable_gradient_checkpointing()
        compilation.compile_denoiser(self.components.denoiser, self.settings)
        self.trainable = self.trained.parameters
        self.ema = None
        if self.settings.use_ema:
            from simpletuner.training.ema import EMA

            self.ema = EMA(self.trainable, self.settings)

    def setup_optimization(self) -> None:
        settings = self.settings
        learning_rate = lr_schedules.scaled_learning_rate(settings, self.accelerator.num_processes)
        groups = self.trained.param_groups(learning_rate)
        self.total_steps = self._total_steps()
        # The scheduler is stepped by the trainer once per optimizer step, so it counts optimizer steps everywhere.
        self.optimizer, self.lr_scheduler = self.sharded.build_optimization(groups, learning_rate, self.total_steps)
        self.model, self.optimizer, self.lr_scheduler = self.sharded.prepare(self.trained.module, self.optimizer,
                                                                             self.lr_scheduler)
        self.trainable = self.sharded.trainable_parameters(self.model, self.trainable)
        if self.trained.module is self.components.denoiser:
            self.components.denoiser = self.model  # the family predicts through the (possibly DDP-wrapped) module
        if settings.optimizer_release_gradients:
            optimizers.prepare_gradient_release(self.trained.module, self.optimizer)
        self.loss_step = LossStep(self.family, settings, self.weight_dtype)
        self.noise_shard = distributed.noise_shard(self.accelerator, settings)

    def _total_steps(self) -> int:
        if self.settings.max_train_steps:
            return int(self.settings.max_train_steps)
        per_epoch = math.ceil(self.data.steps_per_epoch / int(self.settings.gradient_accumulation_steps or 1))
        return int(self.settings.num_train_epochs) * max(per_epoch, 1)

    def resume_if_requested(self) -> None:
        path = checkpoints.resolve_resume_path(self.settings.output_dir, self.settings.resume_from_checkpoint)
        if path is None:
            return
        self.state.restore(self, path)
        logger.info("Resumed from %s at step %d (epoch %d)", path, self.state.global_step, self.state.epoch)

    def setup_callbacks(self) -> None:
        self.callbacks = build_callbacks(self.settings)
        self.sharded.check_callbacks(self.callbacks, self)
        self.callbacks.on_train_start(self)

    # --- loop --------------------------------------------------------------------------
    def train(self) -> None:
        settings, accelerator = self.settings, self.accelerator
        optimizers.optimizer_train_mode(self.optimizer)
        progress = TrainingProgress(settings, accelerator, self.total_steps, self.state.global_step)
        self.model.train()
        last_epoch = run_length.final_epoch(settings, self.total_steps, self.data.steps_per_epoch)
        while self.state.global_step < self.total_steps:
            prepared = self.data.next_batch()
            if run_length.past_final_epoch(prepared.epoch, last_epoch):
                break
            if prepared.epoch != self.state.epoch:
                self._after_epoch(self.state.epoch)
                self.state.epoch = prepared.epoch
            self.watchdog.enter(f"training step {self.state.global_step + 1}")
            generator = torch.Generator().manual_seed(self._step_seed())
            batch = prepared.batch.to(self.device)
            with accelerator.accumulate(self.model), accelerator.autocast():
                loss = self.loss_step(self.trained.prepare_batch(batch), self.state.global_step, generator,
                                      self.noise_shard)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    self._clip_gradients()
                self.optimizer.step()
                if accelerator.sync_gradients:
                    self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=bool(settings.set_grads_to_none))
            self.state.accumulate_loss(loss.detach(), batch.sample_ids)
            self.sample_log.record(self.state.global_step + 1, self.state.micro_step, batch.sample_ids)
            if accelerator.sync_gradients:
                self._after_optimizer_step(progress)
        progress.close()

    def _step_seed(self) -> int:
        """The same on every rank: ranks differ through their rows of the draws (see noise_shard)."""
        seed = self.settings.seed or 0
        return (seed * 1_000_003 + self.state.micro_step * 7919) % (2**63 - 1)

    def _clip_gradients(self) -> None:
        limit = self.settings.max_grad_norm
        if not limit or self.settings.optimizer_release_gradients:  # released gradients never coexist
            return
        norm = self.sharded.clip_gradients(self.trainable, self.settings.grad_clip_method, limit)
        if norm is not None:
            self.grad_norm = norm  # read when logged

    def _after_optimizer_step(self, progress: TrainingProgress) -> None:
        state = self.state
        state.global_step += 1
        if self.ema is not None:
            self.ema.update(state.global_step)
        loss = state.pop_step_loss()
        progress.step(state.global_step, loss, self.lr_scheduler.get_last_lr()[0], state.epoch,
                      grad_norm=getattr(self, "grad_norm", None))
        if self._checkpoint_due():
            self.save_checkpoint()
        self.callbacks.on_step_end(self, state.global_step, loss)

    def _after_epoch(self, epoch: int) -> None:
        interval = self.settings.checkpoint_epoch_interval
        if interval and epoch % int(interval) == 0 and self.state.global_step < self.total_steps:
            self.save_checkpoint()
        self.callbacks.on_epoch_end(self, epoch)

    def _checkpoint_due(self) -> bool:
        step = self.state.global_step
        if step >= self.total_steps:
            return False
        if self.settings.checkpoint_step_interval and step % int(self.settings.checkpoint_step_interval) == 0:
            return True
        return bool(self._rolling_due())

    def _rolling_due(self) -> bool:
        rolling = self.settings.checkpointing_rolling_steps
        regular = self.settings.checkpoint_step_interval
        step = self.state.global_step
        return bool(rolling) and step % int(rolling) == 0 and not (regular and step % int(regular) == 0)

    def save_checkpoint(self) -> str | None:
        self.watchdog.enter("save_checkpoint")
        self.accelerator.wait_for_everyone()
        # Every rank writes its part (its RNG state, its shard of a sharded model); rank 0 writes the rest.
        with offloaded_during_save(self) if self.accelerator.is_main_process else contextlib.nullcontext():
            path = self.state.save(self, rolling=self._rolling_due())
        if self.accelerator.is_main_process:
            checkpoints.rotate_checkpoints(self.settings.output_dir, self.settings.checkpoints_total_limit,
                                           self.settings.checkpoints_rolling_total_limit)
            logger.info("Saved checkpoint %s", path)
            self.callbacks.on_checkpoint(self, path, self.state.global_step)
        self.accelerator.wait_for_everyone()
        return path

    # --- finish ------------------------------------------------------------------------
    def finish(self) -> None:
        self.accelerator.wait_for_everyone()
        optimizers.optimizer_eval_mode(self.optimizer)
        module = self.sharded.module_for_saving(self.model)  # every rank takes part when the model is sharded
        if self.accelerator.is_main_process:
            with unloading.text_encoders_for_saving(self), offloaded_during_save(self):
                save_outputs(self.trained, module, self.settings.output_dir, self.ema)
            logger.info("Saved results to %s", os.path.abspath(self.settings.output_dir))
            self.callbacks.on_train_end(self, self.settings.output_dir)
        self.data.close()
        self.sample_log.close()
        distributed.close_watchdog(self.watchdog, self.accelerator)
        self.accelerator.end_training()
