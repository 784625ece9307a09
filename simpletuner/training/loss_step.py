"""One forward pass: noise a batch, ask the family for a prediction, score it.

Shared by every family: DDPM-style families sample integer timesteps from
their noise scheduler; flow-matching families sample sigmas in (0, 1).
"""

from __future__ import annotations

import torch

from simpletuner.config.settings import Settings
from simpletuner.data.types import TrainingBatch
from simpletuner.models.base import ModelFamily
from simpletuner.training import losses, noise
from simpletuner.training.distributed import BatchShard


class LossStep:
    def __init__(self, family: ModelFamily, settings: Settings, weight_dtype: torch.dtype):
        self.family = family
        self.settings = settings
        self.weight_dtype = weight_dtype
        self.scheduler = family.components.noise_scheduler
        self.prediction_type = family.prediction_type()
        self.flow = family.flow_matching or self.prediction_type == "flow_matching"
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)

    def __call__(self, batch: TrainingBatch, step: int, generator: torch.Generator,
                 shard: BatchShard = BatchShard()) -> torch.Tensor:
        """``shard``: in multi-process runs, draw noise and timesteps for the global batch and keep this rank's rows."""
        latents = batch.latents.float()
        drawn_for = shard.global_like(latents)
        clean_noise = noise.make_noise(drawn_for, self.settings, generator)
        if self.flow:
            sigmas = noise.sample_flow_sigmas(drawn_for.shape[0], self.settings, generator, latents.device,
                                              image_seq_len=self.family.image_seq_len(latents))
            model_noise = noise.perturb_noise(clean_noise, self.settings, step, generator)
            clean_noise, model_noise, sigmas = shard.rows(clean_noise, model_noise, sigmas)
            timesteps = sigmas * self.num_train_timesteps
            noisy = noise.flow_noisy_latents(latents, model_noise, sigmas)
            target = noise.flow_target(latents, clean_noise)
        else:
            timesteps = noise.sample_timesteps(drawn_for.shape[0], self.num_train_timesteps, self.settings, generator,
                                               latents.device, step=step)
            model_noise = noise.perturb_noise(clean_noise, self.settings, step, generator)
            clean_noise, model_noise, timesteps = shard.rows(clean_noise, model_noise, timesteps)
            noisy = noise.add_noise(self.scheduler, latents, model_noise, timesteps)
            target = losses.training_target(self.prediction_type, self.scheduler, latents, clean_noise, timesteps)
        prediction = self.family.predict(batch, noisy.to(self.weight_dtype), timesteps)
        loss = losses.diffusion_loss(prediction.float(), target.float(), timesteps, self.scheduler, self.settings,
                                     self.prediction_type, mask=batch.loss_mask)
        extra = self.family.auxiliary_loss()  # e.g. HiDream's router balance term
        return loss if extra is None else loss + extra
