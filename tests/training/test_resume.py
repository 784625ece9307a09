"""Resuming from a checkpoint continues exactly where the uninterrupted run would be."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import base_config, train


@pytest.fixture(scope="module")
def setup(tiny_model, images):
    return tiny_model("sdxl"), images


def test_resume_gives_identical_weights(setup, tmp_path):
    model, images = setup
    config = base_config("sdxl", model, tmp_path, images, max_train_steps=6, checkpoint_step_interval=3,
                         lr_scheduler="cosine", lr_warmup_steps=2, caption_dropout_probability=0.3,
                         resume_from_checkpoint="none")
    train(config)
    output = tmp_path / "output"
    straight = load_file(str(output / "pytorch_lora_weights.safetensors"))
    assert (output / "checkpoint-3" / "manifest.json").exists()
    (output / "pytorch_lora_weights.safetensors").unlink()
    state = train({**config, "resume_from_checkpoint": "latest"})
    assert state.global_step == 6
    resumed = load_file(str(output / "pytorch_lora_weights.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.allclose(straight[key], resumed[key], atol=1e-6), key


def test_latest_skips_a_checkpoint_without_manifest(setup, tmp_path):
    from simpletuner.training.checkpoints import find_latest_checkpoint

    model, images = setup
    config = base_config("sdxl", model, tmp_path, images, max_train_steps=4, checkpoint_step_interval=2,
                         resume_from_checkpoint="none")
    train(config)
    output = tmp_path / "output"
    shutil.copytree(output / "checkpoint-2", output / "checkpoint-9")
    (output / "checkpoint-9" / "manifest.json").unlink()
    assert find_latest_checkpoint(str(output)).endswith("checkpoint-2")


def test_resume_with_a_changed_rank_names_the_difference(setup, tmp_path):
    from simpletuner.config.errors import ConfigError

    model, images = setup
    config = base_config("sdxl", model, tmp_path, images, max_train_steps=4, checkpoint_step_interval=2,
                         resume_from_checkpoint="none")
    train(config)
    with pytest.raises(ConfigError) as caught:
        train({**config, "max_train_steps": 6, "lora_rank": 8, "resume_from_checkpoint": "latest"})
    assert "lora_rank" in str(caught.value)
