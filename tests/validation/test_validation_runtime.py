"""validation_lycoris_strength, validation_torch_compile and external-script validation on the tiny SDXL."""

from __future__ import annotations

import json
import stat
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.runs import base_config, train
from simpletuner.config.settings import Settings
from simpletuner.validation.checks import validation_errors

VALIDATION = {"validation_prompt": "a red circle", "validation_step_interval": 2, "validation_resolution": "64",
              "validation_num_inference_steps": 2, "validation_disable_unconditional": True, "max_train_steps": 2}


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from simpletuner.models.tiny import build_tiny

    return build_tiny("sdxl", str(tmp_path_factory.mktemp("models") / "sdxl"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from simpletuner.demo.sample_data import make_sample_images

    folder = tmp_path_factory.mktemp("images")
    make_sample_images(str(folder), count=2)
    return folder


# --- validation_lycoris_strength ----------------------------------------------------------

def lycoris_run(sdxl_dir, images, root: Path, strength: float) -> np.ndarray:
    """Train a LoKr two steps; the final validation row: [base-model benchmark | trained network at strength]."""
    root.mkdir()
    config_file = root / "lycoris.json"
    config_file.write_text(json.dumps({"algo": "lokr", "linear_dim": 4, "linear_alpha": 4, "factor": 2,
                                       "apply_preset": {"target_module": ["Attention"]}}))
    config = base_config("sdxl", sdxl_dir, root, images, lora_type="lycoris", lycoris_config=str(config_file),
                         learning_rate=5e-2, validation_lycoris_strength=strength, **VALIDATION)
    train(config)
    with Image.open(root / "output" / "validation_images" / "step000002_validation_64x64_0.png") as saved:
        return np.asarray(saved.convert("RGB"), dtype=np.int16)


def test_lycoris_strength_zero_renders_the_base_model(sdxl_dir, images, tmp_path):
    silenced = lycoris_run(sdxl_dir, images, tmp_path / "zero", 0.0)
    assert silenced.shape == (64, 128, 3)
    assert np.array_equal(silenced[:, :64], silenced[:, 64:])
    full = lycoris_run(sdxl_dir, images, tmp_path / "one", 1.0)
    assert np.array_equal(full[:, :64], silenced[:, :64])  # the same benchmark
    assert np.abs(full[:, 64:] - full[:, :64]).max() > 0, "the trained network changes renders at strength 1"


def test_lycoris_strength_without_lycoris_is_refused():
    errors = validation_errors(Settings({"validation_lycoris_strength": 0.5}))
    assert [error.key for error in errors] == ["validation_lycoris_strength"]
    assert validation_errors(Settings({"validation_lycoris_strength": 0.5, "lora_type": "lycoris"})) == []


# --- validation_torch_compile ---------------------------------------------------------------

def test_validation_pipelines_get_a_compiled_view_of_the_live_denoiser(sdxl_dir):
    """Compiling for real takes minutes on CPU (inductor), so this checks what the pipelines are given."""
    from diffusers.utils.torch_utils import is_compiled_module

    from simpletuner.models.registry import get_family
    from simpletuner.validation.compiled import ValidationCompiler
    from simpletuner.validation.renderer import Renderer

    settings = Settings({"model_family": "sdxl", "pretrained_model_name_or_path": sdxl_dir,
                         "validation_torch_compile": True})
    family = get_family("sdxl", settings)(settings)
    family.load(torch.device("cpu"), torch.float32)
    unet = family.components.denoiser
    compiler = ValidationCompiler(settings)
    compiled = compiler.denoiser_for(unet)
    assert is_compiled_module(compiled) and compiled._orig_mod is unet
    assert compiler.denoiser_for(unet) is compiled  # compiled once, reused every round
    renderer = Renderer(family, compiled, settings, torch.device("cpu"), 0, nullcontext)
    assert renderer.pipeline.unet is compiled
    assert getattr(unet, "_compiled_call_impl", None) is None  # training still calls the plain module
    assert ValidationCompiler(Settings({})).denoiser_for(unet) is unet
    trained_compiled = Settings({"validation_torch_compile": True, "dynamo_backend": "inductor"})
    assert ValidationCompiler(trained_compiled).denoiser_for(unet) is unet


# --- validation_method=external-script ------------------------------------------------------

def write_script(folder: Path, body: str) -> Path:
    path = folder / "validate.sh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_external_script_runs_at_validation_times_with_placeholders(sdxl_dir, images, tmp_path):
    log = tmp_path / "calls.txt"
    script = write_script(tmp_path, f'echo "$@" >> "{log}"\n')
    config = base_config("sdxl", sdxl_dir, tmp_path, images, validation_method="external-script",
                         validation_external_script=f"{script} {{local_checkpoint_path}} {{global_step}} "
                                                    "{validation_guidance} {model_family} {not_a_placeholder}",
                         checkpoint_step_interval=1, validation_guidance=4.5,
                         **{**VALIDATION, "max_train_steps": 3})
    train(config)
    output = tmp_path / "output"
    checkpoint = output / "checkpoint-2"
    assert checkpoint.is_dir()
    # step 2 (interval) and step 3 (end of training); the newest checkpoint both times is step 2's.
    # An unknown placeholder becomes an empty argument (the trailing space).
    assert log.read_text().splitlines() == [f"{checkpoint} 2 4.5 sdxl ", f"{checkpoint} 3 4.5 sdxl "]
    assert not (output / "validation_images").exists(), "external validation replaces local renders"


def test_background_script_does_not_hold_up_training(tmp_path):
    from simpletuner.validation.external import ExternalValidation

    go, done = tmp_path / "go", tmp_path / "done"
    script = write_script(tmp_path, f'for i in $(seq 100); do [ -e "{go}" ] && break; sleep 0.1; done\n'
                                    f'echo "$1" > "{done}"\n')
    settings = Settings({"validation_method": "external-script", "validation_external_background": True,
                         "validation_external_script": f"{script} {{global_step}}", "output_dir": str(tmp_path)})
    callback = ExternalValidation(settings)
    started = time.monotonic()
    callback.run_script(7)  # returns while the script still waits for "go"
    assert not done.exists() and time.monotonic() - started < 5
    go.touch()
    callback.runner.wait_all()
    assert done.read_text().strip() == "7"


def test_external_method_needs_a_runnable_script(tmp_path):
    missing = validation_errors(Settings({"validation_method": "external-script"}))
    assert [error.key for error in missing] == ["validation_external_script"]
    absent = validation_errors(Settings({"validation_method": "external-script",
                                         "validation_external_script": str(tmp_path / "nope.sh")}))
    assert [error.key for error in absent] == ["validation_external_script"]
    assert "not found or is not executable" in str(absent[0])
