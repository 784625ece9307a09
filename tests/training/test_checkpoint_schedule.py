"""Epoch-based and rolling checkpoints are written when they are due and rotated."""

from __future__ import annotations

import pytest

from helpers.runs import base_config, train


@pytest.fixture(scope="module")
def setup(tiny_model, images):
    return tiny_model("sd1x"), images


def test_epoch_interval_checkpoints(setup, tmp_path):
    model, images = setup
    # 6 square-cropped images, batch 2: three steps per epoch.
    train(base_config("sd1x", model, tmp_path, images, max_train_steps=7, checkpoint_epoch_interval=1,
                      resume_from_checkpoint="none"))
    names = sorted(p.name for p in (tmp_path / "output").iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-3", "checkpoint-6"]


def test_rolling_checkpoints_keep_only_the_newest(setup, tmp_path):
    model, images = setup
    train(base_config("sd1x", model, tmp_path, images, max_train_steps=7, checkpointing_rolling_steps=2,
                      checkpoints_rolling_total_limit=1, checkpoint_step_interval=5, resume_from_checkpoint="none"))
    names = sorted(p.name for p in (tmp_path / "output").iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-5", "rolling-checkpoint-6"]
