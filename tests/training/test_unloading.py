"""fully_unload_text_encoder: the encoders' memory is released after caching, and they come back when needed."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.runs import base_config, run_trainer
from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.config.validate import validate_settings
from simpletuner.models.base import Components
from simpletuner.training import offload, unloading

IMAGE_COUNT = 4  # sample images in this module's copy (the `images` fixture in tests/conftest.py)
CPU = torch.device("cpu")
VALIDATION = {"validation_prompt": "a red circle", "validation_resolution": "64", "num_validation_images": 1,
              "validation_num_inference_steps": 2, "validation_disable_unconditional": True,
              "validation_step_interval": 100, "max_train_steps": 2}


class WatchedUnloads:
    """Wraps the trainer's unload/reload points to keep weak references to each set of encoders."""

    def __init__(self, monkeypatch):
        self.first: list[weakref.ref] = []
        self.dead_after_unload: bool | None = None
        self.reloaded: list[weakref.ref] = []
        original_hook = unloading.unload_after_caching
        original_reload = unloading.TextEncoderUnloader._reload

        def unload_after_caching(trainer):
            self.first = [weakref.ref(encoder) for encoder in trainer.components.text_encoders]
            result = original_hook(trainer)
            self.dead_after_unload = all(ref() is None for ref in self.first)
            return result

        def reload(unloader, purpose):
            original_reload(unloader, purpose)
            self.reloaded.extend(weakref.ref(encoder) for encoder in unloader.components.text_encoders)

        monkeypatch.setattr(unloading, "unload_after_caching", unload_after_caching)
        monkeypatch.setattr(unloading.TextEncoderUnloader, "_reload", reload)


def validation_pixels(output: Path) -> dict[str, np.ndarray]:
    folder = output / "validation_images"
    return {path.name: np.asarray(Image.open(path).convert("RGB")) for path in sorted(folder.glob("*.png"))}


def test_unloaded_encoders_are_freed_and_validation_loads_them_again(tiny_model, images, tmp_path, monkeypatch):
    model = tiny_model("sdxl")
    (tmp_path / "plain").mkdir()
    (tmp_path / "unloaded").mkdir()
    plain = run_trainer(base_config("sdxl", model, tmp_path / "plain", images, **VALIDATION))
    watched = WatchedUnloads(monkeypatch)
    trainer = run_trainer(base_config("sdxl", model, tmp_path / "unloaded", images, fully_unload_text_encoder=True,
                                      **VALIDATION))
    assert len(watched.first) == 2 and watched.dead_after_unload  # nothing kept the encoders alive
    # Loaded for the benchmark at the start and for the final round, and released after each.
    assert len(watched.reloaded) == 4
    gc.collect()
    assert all(ref() is None for ref in watched.reloaded)
    assert all(isinstance(slot, unloading.UnloadedTextEncoder) for slot in trainer.components.text_encoders)
    assert trainer.state.loss_history == pytest.approx(plain.state.loss_history, abs=1e-6)
    # The reloaded encoders are the base model's: the renders match the run that kept them.
    expected = validation_pixels(tmp_path / "plain" / "output")
    rendered = validation_pixels(tmp_path / "unloaded" / "output")
    assert expected and rendered.keys() == expected.keys()
    assert all(np.array_equal(rendered[name], expected[name]) for name in expected)
    assert (tmp_path / "unloaded" / "output" / "pytorch_lora_weights.safetensors").is_file()


def test_a_full_model_saves_the_reloaded_text_encoders(tiny_model, images, tmp_path):
    from transformers import CLIPTextModel

    model = tiny_model("sdxl")
    trainer = run_trainer(base_config("sdxl", model, tmp_path, images, model_type="full", max_train_steps=1,
                                      learning_rate=1e-4, validation_disable=True, fully_unload_text_encoder=True))
    assert isinstance(trainer.components.text_encoders[0], unloading.UnloadedTextEncoder)
    saved = CLIPTextModel.from_pretrained(tmp_path / "output", subfolder="text_encoder").state_dict()
    original = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").state_dict()
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[key], original[key]) for key in original)


class FakeFamily:
    """Loads two small "encoders" on request, as a family's load_text_encoders does."""

    name = "fake"

    def __init__(self):
        self.loads = 0

    def load_text_encoders(self, weight_dtype):
        self.loads += 1
        return [torch.nn.Linear(4, 4).to(weight_dtype), torch.nn.Linear(4, 2).to(weight_dtype)]


def small_components(encoders) -> Components:
    return Components(denoiser=torch.nn.Linear(2, 2), vae=torch.nn.Linear(2, 2), text_encoders=list(encoders))


def test_the_vae_offload_hook_no_longer_holds_unloaded_encoders():
    settings = Settings({"offload_during_startup": True})
    family = FakeFamily()
    components = small_components(family.load_text_encoders(torch.float32))
    offload.offload_text_encoders(components, CPU, after_each_use=False)  # the VAE's hook lists the encoders
    refs = [weakref.ref(encoder) for encoder in components.text_encoders]
    unloader = unloading.TextEncoderUnloader(family, components, settings, CPU, torch.float32)
    unloader.unload()
    assert all(ref() is None for ref in refs)
    with unloader.loaded("a test"):
        reloaded = list(components.text_encoders)
        assert family.loads == 2 and all(not p.requires_grad for e in reloaded for p in e.parameters())
        assert isinstance(reloaded[0]._hf_hook, offload.VisitDevice)  # offloaded like the first ones
        assert components.vae._hf_hook.others == reloaded
        with unloader.loaded("a nested use"):  # already loaded: no second load
            assert family.loads == 2
    assert isinstance(components.text_encoders[1], unloading.UnloadedTextEncoder)


def test_an_unloaded_slot_names_the_option():
    slot = unloading.UnloadedTextEncoder(0)
    with pytest.raises(AttributeError, match="text encoder 1 was unloaded .*fully_unload_text_encoder"):
        slot.device
    with pytest.raises(AttributeError, match="fully_unload_text_encoder"):
        slot(torch.zeros(1))


def test_encoders_of_a_single_file_checkpoint_cannot_come_back(tmp_path):
    from simpletuner.models.sdxl import StableDiffusionXL

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    family = StableDiffusionXL(Settings({"model_family": "sdxl", "pretrained_model_name_or_path": str(checkpoint)}))
    components = small_components([torch.nn.Linear(2, 2)])
    unloader = unloading.TextEncoderUnloader(family, components, Settings({}), CPU, torch.float32)
    unloader.unload()
    with pytest.raises(ConfigError, match="validation needs them again, but the text encoders inside the "
                                          "single-file checkpoint") as raised:
        with unloader.loaded("validation"):
            pass
    assert raised.value.key == "fully_unload_text_encoder"


def test_trained_text_encoders_cannot_be_unloaded():
    settings = Settings({"model_family": "sdxl", "pretrained_model_name_or_path": "x", "output_dir": "out",
                         "data_backend_config": "x.json", "max_train_steps": 1, "fully_unload_text_encoder": True,
                         "train_text_encoder": True})
    errors = [error for error in validate_settings(settings) if error.key == "fully_unload_text_encoder"]
    assert errors and "cannot be used together" in str(errors[0])


@pytest.mark.parametrize("values,needed", [
    ({}, True),  # validation is on unless disabled
    ({"validation_disable": True}, False),
    ({"validation_disable": True, "model_type": "full"}, True),
])
def test_what_needs_the_encoders_after_caching(values, needed):
    data = SimpleNamespace(specs={}, settings=Settings({}))
    assert unloading.text_encoders_needed_later(Settings(values), data) is needed


@pytest.mark.parametrize("family_name", ["sd1x", "sd2x", "sdxl", "sd3", "flux", "auraflow", "pixart_sigma", "sana",
                                         "lumina2"])
def test_each_family_loads_the_same_text_encoders_again(family_name, tiny_model):
    from simpletuner.models.registry import get_family

    settings = Settings({"model_family": family_name, "pretrained_model_name_or_path": tiny_model(family_name)})
    family = get_family(family_name, settings)(settings)
    loaded = family.load(CPU, torch.float32).text_encoders
    reloaded = family.load_text_encoders(torch.float32)
    assert [type(encoder) for encoder in reloaded] == [type(encoder) for encoder in loaded]
    for first, again in zip(loaded, reloaded):
        expected, actual = first.state_dict(), again.state_dict()
        assert actual.keys() == expected.keys()
        assert all(torch.equal(actual[key], expected[key]) for key in expected)
