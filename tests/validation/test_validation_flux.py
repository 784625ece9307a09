"""Validation on the tiny Flux (flow matching): true CFG renders, flow eval loss, and what Flux refuses."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest

from helpers.runs import base_config, train
from simpletuner.config.settings import Settings


@pytest.fixture(scope="module")
def flux_model(tmp_path_factory):
    from simpletuner.models.tiny import build_tiny

    return build_tiny("flux", str(tmp_path_factory.mktemp("models") / "flux"))


def eval_losses(output: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[int, float] = {}
    for events in glob.glob(str(output / "logs" / "**" / "events.out.tfevents.*"), recursive=True):
        accumulator = EventAccumulator(os.path.dirname(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if "eval_loss" in accumulator.Tags()["scalars"]:
            found.update({event.step: event.value for event in accumulator.Scalars("eval_loss")})
    return found


def test_flux_validation_with_true_cfg_and_flow_eval_loss(flux_model, tmp_path):
    from simpletuner.demo.sample_data import make_sample_images

    make_sample_images(str(tmp_path / "train"), count=4)
    make_sample_images(str(tmp_path / "eval"), count=2)
    config = base_config("flux", flux_model, tmp_path, tmp_path / "train", learning_rate=1e-3, max_train_steps=2,
                         validation_prompt="a blue square", validation_step_interval=2, validation_resolution="64",
                         num_validation_images=1, validation_num_inference_steps=2, validation_guidance=3.5,
                         validation_guidance_real=2.0, validation_noise_scheduler="euler", disable_benchmark=True,
                         report_to="tensorboard", eval_steps_interval=1, eval_timesteps=3, eval_dataset_pooling=True)
    path = Path(config["data_backend_config"])
    datasets = json.loads(path.read_text())
    datasets.append({"id": "flux-eval", "type": "local", "dataset_type": "eval", "instance_data_dir": str(tmp_path / "eval"),
                     "caption_strategy": "textfile", "resolution": 64, "resolution_type": "pixel",
                     "minimum_image_size": 32, "crop": True, "crop_style": "center", "crop_aspect": "square",
                     "cache_dir_vae": str(tmp_path / "cache" / "vae-eval")})
    path.write_text(json.dumps(datasets))
    train(config)
    output = tmp_path / "output"
    # The unconditional render is on by default: one image per prompt, including the empty one.
    assert sorted(os.listdir(output / "validation_images")) == ["step000002_unconditional_64x64_0.png",
                                                                 "step000002_validation_64x64_0.png"]
    losses = eval_losses(output)
    assert sorted(losses) == [1, 2] and all(value > 0 for value in losses.values())


def test_flux_refuses_ddpm_samplers_and_guidance_rescale(flux_model):
    from simpletuner.validation.checks import validation_errors

    settings = Settings({"model_family": "flux", "pretrained_model_name_or_path": flux_model,
                         "validation_prompt": "a cat", "validation_noise_scheduler": "ddim",
                         "validation_guidance_rescale": 0.7})
    errors = {error.key: str(error) for error in validation_errors(settings)}
    assert set(errors) == {"validation_noise_scheduler", "validation_guidance_rescale"}
    assert "flow-matching" in errors["validation_noise_scheduler"]
    assert "FluxPipeline has no guidance_rescale" in errors["validation_guidance_rescale"]
