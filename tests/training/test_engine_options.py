"""Engine options: BitFit, ignore_final_epochs, snr_weight, text-encoder freezing and limits, and their checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers.runs import base_config, train
from simpletuner.config.settings import Settings


IMAGE_COUNT = 4  # sample images in this module's copy (the `images` fixture in tests/conftest.py)


@pytest.fixture(scope="module")
def sd1x_model(tiny_model):
    return tiny_model("sd1x")


# --- BitFit ---------------------------------------------------------------------------------------
def test_bitfit_trains_only_the_biases(sd1x_model, images, tmp_path):
    from diffusers import UNet2DConditionModel

    train(base_config("sd1x", sd1x_model, tmp_path, images, model_type="full", layer_freeze_strategy="bitfit",
                      learning_rate=1e-2, max_train_steps=2))
    trained = UNet2DConditionModel.from_pretrained(str(tmp_path / "output"), subfolder="unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(sd1x_model, subfolder="unet").state_dict()
    changed = {key for key in base if not torch.equal(trained[key].float(), base[key].float())}
    assert changed, "BitFit changed nothing"
    assert all(key.endswith(".bias") for key in changed), sorted(changed - {k for k in changed if k.endswith(".bias")})


# --- ignore_final_epochs --------------------------------------------------------------------------
def test_a_resume_with_longer_epochs_stops_at_the_epoch_limit_unless_told_to_ignore_it(sd1x_model, images, tmp_path):
    # First run: 4 images in one batch, so each step is an epoch; the checkpoint at step 3 is in epoch 3.
    first = base_config("sd1x", sd1x_model, tmp_path, images, train_batch_size=4, max_train_steps=6,
                        checkpoint_step_interval=3, resume_from_checkpoint="none")
    train(first)
    checkpoint = str(tmp_path / "output" / "checkpoint-3")
    # Resumed with batch size 1, an epoch is 4 steps: 6 steps need only 2 epochs, and the run is already in the 3rd.
    resumed = {**first, "train_batch_size": 1, "resume_from_checkpoint": checkpoint}
    assert train(resumed).global_step == 3
    assert train({**resumed, "ignore_final_epochs": True}).global_step == 6


def test_final_epoch_covers_every_step_of_an_uninterrupted_run():
    from simpletuner.training.run_length import final_epoch, past_final_epoch

    settings = Settings({"gradient_accumulation_steps": 2})
    assert final_epoch(settings, total_steps=4, batches_per_epoch=3) == 3  # 8 batches span 3 epochs of 3
    assert final_epoch(Settings({"ignore_final_epochs": True}), 4, 3) is None
    assert not past_final_epoch(3, 3) and past_final_epoch(4, 3) and not past_final_epoch(99, None)


# --- snr_weight -----------------------------------------------------------------------------------
def _loss(settings, prediction_type="epsilon"):
    from diffusers import DDPMScheduler

    from simpletuner.training.losses import diffusion_loss

    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    return diffusion_loss(prediction, target, torch.tensor([100, 800]), DDPMScheduler(), settings, prediction_type)


def test_snr_weight_scales_the_plain_loss_only():
    plain = _loss(Settings({}))
    assert torch.allclose(_loss(Settings({"snr_weight": 2.5})), plain * 2.5)
    min_snr = Settings({"snr_gamma": 5.0})
    assert torch.allclose(_loss(Settings({"snr_gamma": 5.0, "snr_weight": 2.5})), _loss(min_snr))
    flow = _loss(Settings({}), "flow_matching")
    assert torch.allclose(_loss(Settings({"snr_weight": 2.5}), "flow_matching"), flow)


# --- text encoder: freezing, limit, learning rates --------------------------------------------------
@pytest.mark.parametrize("strategy, frozen", [("before", [0, 1]), ("after", [4, 5]), ("between", [0, 1, 4, 5])])
def test_freeze_strategies_pick_layers_by_index(strategy, frozen):
    from simpletuner.training.text_encoder_training import layer_is_frozen

    settings = Settings({"freeze_encoder_strategy": strategy, "freeze_encoder_before": 2,
                         "freeze_encoder_after": 3})
    assert [index for index in range(6) if layer_is_frozen(index, settings)] == frozen


def test_freeze_layers_stops_gradients_of_whole_layers_only():
    from transformers import CLIPTextConfig, CLIPTextModel

    from simpletuner.training.text_encoder_training import freeze_layers

    encoder = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                           num_hidden_layers=4, vocab_size=100, bos_token_id=0, eos_token_id=1))
    encoder.requires_grad_(True)
    settings = Settings({"freeze_encoder_strategy": "after", "freeze_encoder_after": 1})
    assert freeze_layers(encoder, settings) > 0
    for name, parameter in encoder.named_parameters():
        in_late_layer = ".layers.2." in name or ".layers.3." in name
        assert parameter.requires_grad != in_late_layer, name


def test_text_encoder_limit_stops_training_once_the_share_is_passed():
    from simpletuner.training.text_encoder_training import TextEncoderLimit

    stopped = []
    encoders = SimpleNamespace(stopped=False, stop_training=lambda: stopped.append(trainer.state.global_step))
    trainer = SimpleNamespace(trained=SimpleNamespace(text_encoders=encoders), total_steps=4,
                              state=SimpleNamespace(global_step=0))
    limit = TextEncoderLimit(50.0)
    limit.on_train_start(trainer)
    for step in range(1, 5):
        trainer.state.global_step = step
        limit.on_step_end(trainer, step, 0.0)
        encoders.stopped = bool(stopped)
    assert stopped == [3]  # 2/4 is not past 50%, 3/4 is


def test_text_encoder_learning_rate_follows_lr_scaling():
    from simpletuner.training.text_encoder_training import text_encoder_learning_rate

    assert text_encoder_learning_rate(Settings({"learning_rate": 1e-4}), 4e-4) == pytest.approx(4e-4)
    assert text_encoder_learning_rate(Settings({"learning_rate": 1e-4, "text_encoder_lr": 1e-5}),
                                      4e-4) == pytest.approx(4e-5)


def test_text_encoders_get_their_own_parameter_group(sd1x_model):
    from simpletuner.models.registry import get_family
    from simpletuner.training.trainable import make_trainable

    settings = Settings({"model_family": "sd1x", "pretrained_model_name_or_path": sd1x_model, "lora_rank": 2,
                         "train_text_encoder": True, "learning_rate": 1e-4, "text_encoder_lr": 3e-5})
    family = get_family("sd1x")(settings)
    family.load(torch.device("cpu"), torch.bfloat16)
    trained = make_trainable(family, settings)
    trained.attach()
    denoiser_group, encoder_group = trained.param_groups(1e-4)
    assert encoder_group["lr"] == pytest.approx(3e-5) and denoiser_group["lr"] == pytest.approx(1e-4)
    encoder_ids = {id(p) for p in family.components.text_encoders[0].parameters()}
    assert encoder_group["params"] and all(id(p) in encoder_ids for p in encoder_group["params"])
    # Trained weights are float32 master copies, so gradients accumulate in float32 (gradient_precision).
    assert all(p.dtype == torch.float32 for group in (denoiser_group, encoder_group) for p in group["params"])


# --- checks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, option", [
    ({"text_encoder_lr": 1e-5}, "text_encoder_lr"),
    ({"train_text_encoder": True, "lora_type": "lycoris"}, "train_text_encoder"),
    ({"train_text_encoder": True, "lora_format": "comfyui"}, "lora_format"),
    ({"train_text_encoder": True, "num_processes": 2}, "train_text_encoder"),
    ({"train_text_encoder": True, "controlnet": True}, "train_text_encoder"),
    ({"train_text_encoder": True, "optimizer_release_gradients": True}, "optimizer_release_gradients"),
    ({"train_text_encoder": True, "text_encoder_limit": -1}, "text_encoder_limit"),
    ({"train_text_encoder": True, "freeze_encoder_strategy": "between", "freeze_encoder_before": 9,
      "freeze_encoder_after": 3}, "freeze_encoder_before"),
    ({"layer_freeze_strategy": "bitfit"}, "layer_freeze_strategy"),
])
def test_engine_checks_name_the_option(values, option):
    from simpletuner.training.engine_checks import engine_errors

    errors = engine_errors(Settings({"model_type": "lora", **values}))
    assert [error.key for error in errors] == [option]


def test_engine_checks_accept_a_normal_text_encoder_run():
    from simpletuner.training.engine_checks import engine_errors

    assert engine_errors(Settings({"train_text_encoder": True, "text_encoder_lr": 1e-5})) == []
    assert engine_errors(Settings({"model_type": "full", "layer_freeze_strategy": "bitfit"})) == []


@pytest.mark.parametrize("family", ["flux", "sd3", "auraflow", "pixart_sigma", "sana", "lumina2"])
def test_families_without_text_encoder_training_refuse_it(family):
    from simpletuner.models.registry import get_family

    problems = get_family(family).check_settings(Settings({"model_family": family, "train_text_encoder": True}))
    assert any("train_text_encoder" in problem for problem in problems)


def test_flux_schnell_needs_the_fast_schedule_unless_overridden():
    from simpletuner.models.registry import get_family

    flux = get_family("flux")
    assert any("flux_fast_schedule" in p for p in flux.check_settings(Settings({"model_flavour": "schnell"})))
    assert flux.check_settings(Settings({"model_flavour": "schnell", "flux_fast_schedule": True})) == []
    assert flux.check_settings(Settings({"model_flavour": "schnell", "i_know_what_i_am_doing": True})) == []
