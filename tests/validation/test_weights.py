"""Eval mode around validation (model, schedule-free optimizer, VAE) and which weights are rendered."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from simpletuner.config.settings import Settings
from simpletuner.training.ema import EMA
from simpletuner.training.optimizers import build_optimizer, optimizer_train_mode
from simpletuner.validation.weights import EMA as EMA_LABEL
from simpletuner.validation.weights import TRAINED, base_weights, validation_mode, weight_variants


def fake_trainer(settings: Settings, with_ema: bool = False):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    params = list(model.parameters())
    optimizer = build_optimizer(settings, [{"params": params, "lr": 1e-2}])
    optimizer_train_mode(optimizer)
    vae = torch.nn.Conv2d(3, 3, 1).to(torch.bfloat16)
    return SimpleNamespace(
        settings=settings, model=model, optimizer=optimizer, trainable=params, device=torch.device("cpu"),
        weight_dtype=torch.float32, components=SimpleNamespace(vae=vae, denoiser=model),
        accelerator=SimpleNamespace(unwrap_model=lambda module: module),
        ema=EMA(params, settings) if with_ema else None, state=SimpleNamespace(global_step=0))


def test_validation_mode_switches_everything_and_restores_it():
    trainer = fake_trainer(Settings({"optimizer": "adamw_schedulefree", "learning_rate": 1e-2}))
    trainer.model.train()
    group = trainer.optimizer.param_groups[0]
    assert group["train_mode"]
    with validation_mode(trainer):
        assert not trainer.model.training
        assert not group["train_mode"]
        assert trainer.components.vae.weight.dtype == torch.float32  # no autocast without mixed precision
    assert trainer.model.training and group["train_mode"]
    assert trainer.components.vae.weight.dtype == torch.bfloat16


def test_validation_mode_at_the_end_stays_in_eval_mode():
    trainer = fake_trainer(Settings({"optimizer": "adamw_schedulefree", "learning_rate": 1e-2}))
    with validation_mode(trainer, resume_training=False):
        pass
    assert not trainer.model.training and not trainer.optimizer.param_groups[0]["train_mode"]


def test_weight_variants_follow_ema_validation():
    base = {"optimizer": "adamw_bf16", "learning_rate": 1e-2, "use_ema": True}
    for mode, expected in (("none", [TRAINED]), ("ema_only", [EMA_LABEL]), ("comparison", [TRAINED, EMA_LABEL])):
        trainer = fake_trainer(Settings({**base, "ema_validation": mode}), with_ema=True)
        assert [label for label, _ in weight_variants(trainer)] == expected
    no_ema = fake_trainer(Settings({"optimizer": "adamw_bf16", "ema_validation": "ema_only"}))
    assert [label for label, _ in weight_variants(no_ema)] == [TRAINED]


def test_ema_variant_swaps_the_averaged_weights_in():
    trainer = fake_trainer(Settings({"optimizer": "adamw_bf16", "use_ema": True, "ema_validation": "ema_only"}),
                           with_ema=True)
    trained = trainer.model.weight.detach().clone()
    with torch.no_grad():
        trainer.model.weight.add_(1.0)  # the live weights move away from the (older) average
    (_, swapped), = weight_variants(trainer)
    with swapped():
        assert torch.equal(trainer.model.weight, trained)
    assert torch.equal(trainer.model.weight, trained + 1.0)


def test_base_weights_need_an_untouched_or_adapter_model():
    trainer = fake_trainer(Settings({"optimizer": "adamw_bf16", "model_type": "full"}))
    assert base_weights(trainer) is not None
    trainer.state.global_step = 5
    assert base_weights(trainer) is None
