"""Validation adapters: which runs the options ask for, attaching LoRA files to the live model and removing them."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.validation.adapter_specs import BASE_RUN, AdapterRun, adapter_file, adapter_runs

RANK, ALPHA = 4, 8.0  # alpha != rank, so a loader that ignores alpha renders differently


# --- which runs ---------------------------------------------------------------------------

def test_single_adapter_modes(tmp_path):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    base = {"validation_adapter_path": str(lora), "validation_adapter_strength": 0.5}
    only = adapter_runs(Settings(base))
    assert len(only) == 1 and only[0].label == "style"
    assert only[0].adapters[0].strength == 0.5 and only[0].adapters[0].is_local
    compared = adapter_runs(Settings({**base, "validation_adapter_mode": "comparison",
                                      "validation_adapter_name": "my style"}))
    assert compared[0] is BASE_RUN and compared[1].label == "my style"
    assert compared[1].adapters[0].adapter_name == "my_style"
    assert adapter_runs(Settings({**base, "validation_adapter_mode": "none"})) == [BASE_RUN]
    assert adapter_runs(Settings({})) == [BASE_RUN]


def test_adapter_config_lists_runs_after_the_base_run(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    config = {"runs": [
        {"label": "soft", "path": str(tmp_path / "a.safetensors"), "strength": 0.25},
        {"label": "soft", "paths": [str(tmp_path / "a.safetensors"),
                                    {"path": str(tmp_path / "b.safetensors"), "adapter_name": "bee", "strength": 3}]},
        "org/some-lora:weights.safetensors",
    ]}
    path = tmp_path / "adapters.json"
    path.write_text(json.dumps(config))
    runs = adapter_runs(Settings({"validation_adapter_config": str(path)}))
    assert runs[0] is BASE_RUN
    assert [run.label for run in runs[1:]] == ["soft", "soft_2", "weights"]
    assert runs[1].adapters[0].strength == 0.25
    assert [(a.adapter_name, a.strength) for a in runs[2].adapters] == [("a", 1.0), ("bee", 3.0)]
    hub = runs[3].adapters[0]
    assert (hub.location, hub.weight_name, hub.is_local) == ("org/some-lora", "weights.safetensors", False)
    inline = adapter_runs(Settings({"validation_adapter_config": json.dumps([str(tmp_path / "b.safetensors")])}))
    assert [run.label for run in inline] == ["", "b"]


@pytest.mark.parametrize("settings, message", [
    ({"validation_adapter_path": "missing/file.safetensors"}, "neither an existing file"),
    ({"validation_adapter_path": "org/repo", "validation_adapter_strength": 0}, "above 0"),
    ({"validation_adapter_path": "org/repo", "validation_adapter_name": "default"}, "trained adapter's own name"),
    ({"validation_adapter_config": "[{\"label\": \"x\"}]"}, "no \"path\""),
    ({"validation_adapter_config": "[{\"path\": \"org/a\"},"}, "not valid JSON"),
    ({"validation_adapter_config": "nowhere.json"}, "no such file"),
])
def test_bad_adapter_options_name_the_option(settings, message):
    with pytest.raises(ConfigError, match=message) as caught:
        adapter_runs(Settings(settings))
    assert caught.value.key in settings


# --- attaching to the live model -----------------------------------------------------------

def load_sdxl(model_dir: str, **options):
    from simpletuner.models.registry import get_family

    settings = Settings({"model_family": "sdxl", "pretrained_model_name_or_path": model_dir, "lora_rank": RANK,
                         "validation_num_inference_steps": 2, "validation_disable_unconditional": True, **options})
    family = get_family("sdxl", settings)(settings)
    components = family.load(torch.device("cpu"), torch.float32)
    components.vae.to(torch.float32)
    return family


def write_external_lora(family, folder) -> tuple[str, str]:
    """A LoRA with random (non-zero) up matrices, as a diffusers folder and as a ComfyUI file."""
    from peft import get_peft_model_state_dict

    from simpletuner.training import adapters, comfyui_format

    unet = family.components.denoiser
    config = adapters.lora_config(Settings({"lora_rank": RANK, "lora_alpha": ALPHA}), family.lora_target_modules())
    unet.add_adapter(config, adapter_name="external")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if ".external." in name and "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    state = get_peft_model_state_dict(unet, adapter_name="external")
    unet.delete_adapters("external")
    diffusers_dir = os.path.join(folder, "diffusers")
    family.save_lora(diffusers_dir, state, adapter_metadata={"unet": config.to_dict()})
    comfy_file = os.path.join(folder, "comfy_style.safetensors")
    comfyui_format.save_comfyui_lora(comfy_file, state, ALPHA)
    return diffusers_dir, comfy_file


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from simpletuner.models.tiny import build_tiny

    return build_tiny("sdxl", str(tmp_path_factory.mktemp("models") / "sdxl"))


@pytest.fixture(scope="module")
def lora_setup(sdxl_dir, tmp_path_factory):
    """A tiny SDXL with a trained-style PEFT adapter attached, and an external LoRA in two layouts."""
    from simpletuner.training.trainable import make_trainable

    family = load_sdxl(sdxl_dir)
    files = write_external_lora(family, str(tmp_path_factory.mktemp("loras")))
    trained = make_trainable(family, family.settings)
    trained.attach()
    return family, files


def render(family, seed: int = 5) -> np.ndarray:
    from simpletuner.validation.images import RenderKey
    from simpletuner.validation.prompts import ValidationPrompt
    from simpletuner.validation.renderer import Renderer

    renderer = Renderer(family, family.components.denoiser, family.settings, torch.device("cpu"), seed, nullcontext)
    image = renderer.render(ValidationPrompt("validation", "a red circle"), RenderKey("validation", 64, 64, 0))
    return np.asarray(image, dtype=np.int16)


def snapshot(module: torch.nn.Module) -> tuple:
    return (sorted(module.state_dict()), {name: p.requires_grad for name, p in module.named_parameters()},
            list(module.peft_config) if hasattr(module, "peft_config") else None)


def run_for(location: str, strength: float = 1.0, name: str = "extra") -> AdapterRun:
    return AdapterRun(name, (adapter_file(location, name, strength, "validation_adapter_path"),))


def test_adapter_changes_renders_and_leaves_the_trained_model_as_it_was(lora_setup):
    from simpletuner.validation.adapter_loading import run_attached

    family, (diffusers_dir, _) = lora_setup
    unet = family.components.denoiser
    before, plain = snapshot(unet), render(family)
    with run_attached(family, unet, run_for(diffusers_dir), "validation_adapter_path"):
        assert set(unet.peft_config) == {"default", "extra"}
        assert sorted(unet.active_adapters()) == ["default", "extra"]
        with_adapter = render(family)
    assert np.abs(with_adapter - plain).max() > 0
    assert snapshot(unet) == before
    assert unet.active_adapters() == ["default"]
    assert np.array_equal(render(family), plain)


def test_comfyui_file_renders_like_the_diffusers_folder_and_strength_scales(lora_setup):
    from simpletuner.validation.adapter_loading import run_attached

    family, (diffusers_dir, comfy_file) = lora_setup
    unet = family.components.denoiser
    images = {}
    for label, run in {"diffusers": run_for(diffusers_dir), "comfy": run_for(comfy_file),
                       "strong": run_for(comfy_file, strength=3.0)}.items():
        with run_attached(family, unet, run, "validation_adapter_config"):
            images[label] = render(family)
    assert np.abs(images["diffusers"] - images["comfy"]).max() <= 1  # the same update, alpha included
    assert np.abs(images["strong"] - images["comfy"]).max() > 10


def test_full_model_gets_its_plain_layers_back(sdxl_dir, lora_setup):
    from simpletuner.validation.adapter_loading import run_attached

    _, (diffusers_dir, _) = lora_setup
    family = load_sdxl(sdxl_dir)
    unet = family.components.denoiser
    unet.requires_grad_(True)
    before, plain = snapshot(unet), render(family)
    with run_attached(family, unet, run_for(diffusers_dir, name="fullrun"), "validation_adapter_path"):
        assert any(".base_layer." in key for key in unet.state_dict())
    assert snapshot(unet) == before
    assert not hasattr(unet, "peft_config")
    assert np.array_equal(render(family), plain)


def test_a_lycoris_file_is_refused_with_the_option_named(lora_setup, tmp_path):
    from safetensors.torch import save_file

    from simpletuner.validation.adapter_loading import run_attached

    family, _ = lora_setup
    path = tmp_path / "network.safetensors"
    save_file({"lycoris_down_blocks_0.lokr_w1": torch.zeros(2, 2)}, str(path))
    before = snapshot(family.components.denoiser)
    with pytest.raises(ConfigError, match="LyCORIS network") as caught:
        with run_attached(family, family.components.denoiser, run_for(str(path)), "validation_adapter_path"):
            pass
    assert caught.value.key == "validation_adapter_path"
    assert snapshot(family.components.denoiser) == before


# --- during training -------------------------------------------------------------------------

def test_training_run_renders_base_and_adapter_side_by_side(sdxl_dir, lora_setup, tmp_path):
    from PIL import Image
    from safetensors import safe_open

    from helpers.runs import base_config, train
    from simpletuner.demo.sample_data import make_sample_images

    _, (diffusers_dir, _) = lora_setup
    make_sample_images(str(tmp_path / "train"), count=2)
    config = base_config("sdxl", sdxl_dir, tmp_path, tmp_path / "train", max_train_steps=2,
                         validation_prompt="a red circle", validation_step_interval=2, validation_resolution="64",
                         validation_num_inference_steps=2, validation_disable_unconditional=True,
                         disable_benchmark=True, validation_adapter_path=diffusers_dir,
                         validation_adapter_mode="comparison", validation_adapter_strength=2.0)
    train(config)
    output = tmp_path / "output"
    with Image.open(output / "validation_images" / "step000002_validation_64x64_0.png") as saved:
        stitched = np.asarray(saved.convert("RGB"), dtype=np.int16)
    assert stitched.shape == (64, 128, 3)  # trained weights, then trained weights + adapter
    assert np.abs(stitched[:, :64] - stitched[:, 64:]).max() > 10
    with safe_open(str(output / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        saved_keys = list(handle.keys())
    assert saved_keys and not any("external" in key or "diffusers" in key for key in saved_keys)
