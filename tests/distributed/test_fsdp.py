"""FSDP2 with two CPU processes (gloo) on the tiny SDXL, full-model training: sharded checkpoints with every
rank's random state, the gathered final model in diffusers layout, agreement with one process, and a resume
requested through accelerate's own flags that switches the checkpoint format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import base_config, train
from helpers.train_process import Run, write_config

IMAGES = 8
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def assets(tiny_model, tmp_path_factory):
    from simpletuner.demo.sample_data import make_sample_images

    root = tmp_path_factory.mktemp("fsdp-images")
    make_sample_images(str(root / "images"), count=IMAGES)
    return Path(tiny_model("sdxl")), root / "images"


def full_config(folder: Path, assets, **overrides) -> dict:
    model, images = assets
    settings = {"model_type": "full", "optimizer": "optimi-adamw", "learning_rate": 1e-3, "train_batch_size": 1,
                "num_processes": 2, "max_train_steps": 4, **overrides}
    return base_config("sdxl", model, folder, images, **settings)


@pytest.fixture(scope="module")
def fsdp_run(assets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    config = write_config(folder, full_config(folder, assets, fsdp_enable=True, checkpoint_step_interval=2))
    return config, Run(folder).succeed()


def test_checkpoints_hold_every_ranks_shard_and_random_state(fsdp_run):
    config, output = fsdp_run
    assert "FSDP2: the model is sharded across 2 processes (checkpoints as SHARDED_STATE_DICT" in output
    checkpoint = Path(config["output_dir"]) / "checkpoint-2"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["config"]["sharding"] == "FSDP"
    assert {"fsdp", "rng-rank0", "rng-rank1"} <= set(manifest["files"]) and "model" not in manifest["files"]
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert len(list((checkpoint / "fsdp" / part).glob("*.distcp"))) == 2, f"{part}: one file per rank"


def test_the_gathered_model_loads_in_diffusers_and_matches_one_process(fsdp_run, assets, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    config, _ = fsdp_run
    pipeline = StableDiffusionXLPipeline.from_pretrained(config["output_dir"])
    image = pipeline("a red circle", num_inference_steps=1, height=64, width=64, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
    assert image.shape[-1] == 64 and torch.isfinite(image).all()

    single = {**config, "fsdp_enable": False, "num_processes": 1, "train_batch_size": 2,
              "checkpoint_step_interval": None, "output_dir": str(tmp_path / "single")}
    train({key: value for key, value in single.items() if value is not None})
    sharded = load_file(str(Path(config["output_dir"]) / UNET_WEIGHTS))
    alone = load_file(str(tmp_path / "single" / UNET_WEIGHTS))
    base = load_file(str(assets[0] / UNET_WEIGHTS))
    assert sharded.keys() == alone.keys()
    assert any(not torch.equal(sharded[key], base[key].float()) for key in sharded), "training changed nothing"
    for key in sharded:
        assert torch.allclose(sharded[key], alone[key], atol=1e-4), key


def test_resume_through_accelerate_flags_continues_exactly(fsdp_run, assets, tmp_path):
    first, _ = fsdp_run
    config = write_config(tmp_path, full_config(tmp_path, assets, checkpoint_step_interval=1,
                                                data_backend_config=first["data_backend_config"]))  # its caches
    output_dir = Path(config["output_dir"])
    shutil.copytree(Path(first["output_dir"]) / "checkpoint-2", output_dir / "checkpoint-2")
    flags = "--use_fsdp --fsdp_version 2 --fsdp_state_dict_type FULL_STATE_DICT"
    output = Run(tmp_path, ACCELERATE_EXTRA_ARGS=flags).succeed()
    assert "checkpoint-2 at step 2" in output and "holds a SHARDED_STATE_DICT; loading it as such" in output

    gathered = torch.load(output_dir / "checkpoint-3" / "fsdp" / "pytorch_model_fsdp.bin", weights_only=True)
    resumed = load_file(str(output_dir / UNET_WEIGHTS))
    assert {key: tuple(t.shape) for key, t in gathered.items()} == {key: tuple(t.shape) for key, t in resumed.items()}
    uninterrupted = load_file(str(Path(first["output_dir"]) / UNET_WEIGHTS))
    for key in resumed:
        assert torch.allclose(resumed[key], uninterrupted[key], atol=1e-6), key
