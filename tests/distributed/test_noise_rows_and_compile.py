"""Per-rank rows of the global noise draws, and torch.compile of the denoiser (in place, regional or whole)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers.images import copy_sample_images
from helpers.runs import base_config, run_trainer
from simpletuner.config.settings import Settings
from simpletuner.data.types import TrainingBatch
from simpletuner.training.compilation import compile_repeated_blocks, compile_spec
from simpletuner.training.distributed import BatchShard
from simpletuner.training.loss_step import LossStep


class ScaledEcho:
    """A stand-in family whose prediction depends on the noisy input and the timestep of each sample."""

    def __init__(self, flow: bool):
        from diffusers import DDPMScheduler

        self.flow_matching = flow
        self.components = SimpleNamespace(noise_scheduler=DDPMScheduler(num_train_timesteps=1000))

    def prediction_type(self) -> str:
        return "flow_matching" if self.flow_matching else "epsilon"

    def auxiliary_loss(self):
        return None

    def image_seq_len(self, latents):
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def predict(self, batch, noisy, timesteps):
        return noisy * 0.5 + timesteps.float().view(-1, 1, 1, 1) / 1000


def batch_of(latents: torch.Tensor) -> TrainingBatch:
    count = latents.shape[0]
    return TrainingBatch(latents, {}, [(64, 64)] * count, [(0, 0)] * count, [(64, 64)] * count,
                         [f"s{i}" for i in range(count)])


@pytest.mark.parametrize("flow", [False, True])
def test_ranks_together_compute_the_single_process_loss(flow):
    settings = Settings({"offset_noise": True, "noise_offset": 0.1, "input_perturbation": 0.1, "seed": 3})
    step = LossStep(ScaledEcho(flow), settings, torch.float32)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    whole = step(batch_of(latents), 0, torch.Generator().manual_seed(11))
    parts = [step(batch_of(latents[rank * 2:(rank + 1) * 2]), 0, torch.Generator().manual_seed(11), BatchShard(rank, 2))
             for rank in range(2)]
    assert torch.allclose(whole, torch.stack(parts).mean(), atol=1e-6)
    assert not torch.allclose(parts[0], parts[1])


def test_the_launchers_dynamo_settings_take_priority():
    settings = Settings({"dynamo_backend": "eager", "dynamo_mode": "max-autotune"})
    assert compile_spec(settings, {}).kwargs()["mode"] == "max-autotune"
    launched = compile_spec(settings, {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR",
                                       "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "True"})
    assert launched.backend == "inductor" and launched.regional
    assert compile_spec(Settings({}), {"ACCELERATE_DYNAMO_BACKEND": "NO"}) is None


def test_regional_compilation_covers_every_block_of_a_repeated_list():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 3))
    assert compile_repeated_blocks(model, {"backend": "eager"}) == 3
    assert model[1][0]._compiled_call_impl is not None and getattr(model[0], "_compiled_call_impl", None) is None


def test_a_compiled_lora_run_saves_loadable_weights(tiny_model, sample_images, tmp_path):
    from diffusers import StableDiffusionPipeline

    model = tiny_model("sd1x")
    copy_sample_images(sample_images, tmp_path / "images", count=4)
    config = base_config("sd1x", model, tmp_path, tmp_path / "images", max_train_steps=2,
                         dynamo_backend="eager", dynamo_use_regional_compilation=True)
    trainer = run_trainer(config)
    compiled = [m for m in trainer.components.denoiser.modules() if getattr(m, "_compiled_call_impl", None)]
    assert compiled and getattr(trainer.components.denoiser, "_compiled_call_impl", None) is None
    pipeline = StableDiffusionPipeline.from_pretrained(model)
    pipeline.load_lora_weights(str(Path(config["output_dir"])))
    assert any("lora" in name for name, _ in pipeline.unet.named_parameters())
