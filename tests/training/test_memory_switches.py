"""gradient_checkpointing_interval and the VAE's slicing and tiling."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers.runs import base_config, run_trainer
from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.config.validate import validate_settings
from simpletuner.models.base import Components
from simpletuner.training import checkpointing, vae_memory


IMAGE_COUNT = 4  # sample images in this module's copy (the `images` fixture in tests/conftest.py)


@pytest.fixture(scope="module")
def sdxl(tiny_model):
    return tiny_model("sdxl")


def unet_from(folder: str):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet")


def unet_loss(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    output = unet(torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 500]),
                  encoder_hidden_states=torch.randn(2, 77, 80, generator=generator),
                  added_cond_kwargs={"text_embeds": torch.randn(2, 48, generator=generator),
                                     "time_ids": torch.randn(2, 6, generator=generator)}).sample
    return output.pow(2).mean()


def count_checkpoints(unet, monkeypatch) -> tuple[int, torch.Tensor]:
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    loss = unet_loss(unet)
    loss.backward()
    return len(calls), loss.detach()


def test_an_interval_checkpoints_every_nth_block_only(sdxl, monkeypatch):
    every = unet_from(sdxl)
    every.enable_gradient_checkpointing()
    all_blocks, expected = count_checkpoints(every, monkeypatch)
    thinned = unet_from(sdxl)
    checkpointing.checkpoint_every_nth_block(thinned, 2)
    first_pass, loss = count_checkpoints(thinned, monkeypatch)
    second_pass, _ = count_checkpoints(thinned, monkeypatch)  # counting restarts with each forward
    assert all_blocks > 2 and first_pass == second_pass == (all_blocks + 1) // 2
    assert torch.allclose(loss, expected)


def test_the_interval_is_applied_when_training_starts(sdxl, images, tmp_path):
    trainer = run_trainer(base_config("sdxl", sdxl, tmp_path, images, max_train_steps=2,
                                      gradient_checkpointing=True, gradient_checkpointing_interval=2))
    functions = {type(module._gradient_checkpointing_func) for module in trainer.trained.module.modules()
                 if getattr(module, "gradient_checkpointing", False)}
    assert functions == {checkpointing.EveryNthBlock}
    assert trainer.state.global_step == 2


@pytest.mark.parametrize("values,match", [
    ({"gradient_checkpointing_interval": 2}, "set gradient_checkpointing=true"),
    ({"gradient_checkpointing": True, "gradient_checkpointing_interval": -1}, "1 or more"),
])
def test_unusable_intervals_are_refused(values, match):
    components = Components(denoiser=torch.nn.Linear(2, 2), vae=None)
    with pytest.raises(ConfigError, match=match):
        checkpointing.check_checkpointing(None, components, Settings(values), torch.device("cpu"))


def test_models_without_checkpointing_refuse_an_interval():
    components = Components(denoiser=torch.nn.Linear(2, 2), vae=None)
    settings = Settings({"gradient_checkpointing": True, "gradient_checkpointing_interval": 2})
    with pytest.raises(ConfigError, match="no gradient checkpointing"):
        checkpointing.check_checkpointing(None, components, settings, torch.device("cpu"))


def test_no_callback_without_an_interval():
    assert checkpointing.interval_callback(Settings({"gradient_checkpointing": True})) is None
    assert checkpointing.interval_callback(Settings({"gradient_checkpointing_interval": 3})) is None


def test_vae_slicing_and_tiling_are_switched_on_and_keep_the_latents(sdxl):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sdxl, subfolder="vae")
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    expected = vae.encode(pixels).latent_dist.mean
    settings = Settings({"vae_enable_slicing": True, "vae_enable_tiling": True})
    vae_memory.configure_vae(SimpleNamespace(name="sdxl"), Components(denoiser=None, vae=vae), settings, "cpu")
    assert vae.use_slicing and vae.use_tiling
    assert torch.allclose(vae.encode(pixels).latent_dist.mean, expected, atol=1e-5)


def test_a_vae_without_tiling_is_refused():
    components = Components(denoiser=None, vae=torch.nn.Conv2d(3, 4, 1))
    with pytest.raises(ConfigError, match="has no tiling"):
        vae_memory.configure_vae(SimpleNamespace(name="x"), components, Settings({"vae_enable_tiling": True}), "cpu")


def test_unsloth_checkpointing_is_planned():
    settings = Settings({"gradient_checkpointing_backend": "unsloth", "max_train_steps": 1})
    assert any("not implemented yet" in str(error) for error in validate_settings(settings))
    components = Components(denoiser=torch.nn.Linear(2, 2), vae=None)
    with pytest.raises(ConfigError, match="not implemented yet"):
        checkpointing.check_checkpointing(None, components, settings, torch.device("cpu"))
