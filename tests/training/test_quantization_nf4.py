"""nf4-bnb after loading: Linear layers become bitsandbytes NF4 Linear4bit, a PEFT LoRA trains on top,
and the saved LoRA loads into diffusers. Runs wherever the installed bitsandbytes supports the device
(recent versions run on the CPU)."""

from __future__ import annotations

import pytest
import torch

from helpers.lora_checks import lora_layers, lora_trained
from helpers.runs import base_config, run_trainer
from simpletuner.config import hardware
from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.training import quantization
from simpletuner.training.nf4 import quantize_to_nf4

IMAGE_COUNT = 4

pytestmark = pytest.mark.skipif(hardware.unmet("bitsandbytes") is not None,
                                reason="the installed bitsandbytes does not run on this device")


def test_nf4_lora_trains_on_a_quantised_flux_and_loads_in_diffusers(tiny_model, images, tmp_path):
    import bitsandbytes as bnb
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    model = tiny_model("flux")
    trainer = run_trainer(base_config("flux", model, tmp_path, images, max_train_steps=3,
                                      base_model_precision="nf4-bnb", text_encoder_2_precision="nf4-bnb"))
    assert trainer.state.global_step == 3 and all(torch.isfinite(torch.tensor(trainer.state.loss_history)))
    transformer = trainer.trained.module
    layers = lora_layers(transformer)
    assert layers and all(isinstance(layer, LoraLinear4bit) for layer in layers)
    base = layers[0].get_base_layer()
    assert isinstance(base, bnb.nn.Linear4bit) and base.weight.dtype == torch.uint8
    assert base.weight.quant_type == "nf4" and not base.weight.requires_grad
    assert lora_trained(transformer)

    float_bytes = quantization.stored_bytes(FluxTransformer2DModel.from_pretrained(model, subfolder="transformer"))
    lora_bytes = sum(p.numel() * p.element_size() for p in trainer.trainable)
    assert quantization.stored_bytes(transformer) - lora_bytes < 0.5 * float_bytes
    t5 = trainer.components.text_encoders[1]
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in t5.modules())
    assert not any(isinstance(module, bnb.nn.Linear4bit) for module in trainer.components.text_encoders[0].modules())

    pipeline = FluxPipeline.from_pretrained(model)
    pipeline.load_lora_weights(str(tmp_path / "output"))
    loaded = lora_layers(pipeline.transformer)
    assert len(loaded) == len(layers)
    (adapter,) = pipeline.get_list_adapters()["transformer"]
    loaded_state = pipeline.transformer.state_dict()
    for name, tensor in transformer.state_dict().items():
        if ".lora_B.default." in name:  # the trained up-projections arrive unchanged
            twin = loaded_state[name.replace(".lora_B.default.", f".lora_B.{adapter}.")]
            torch.testing.assert_close(twin.float(), tensor.float())


def test_nf4_lora_trains_on_a_quantised_sdxl(tiny_model, images, tmp_path):
    import bitsandbytes as bnb

    trainer = run_trainer(base_config("sdxl", tiny_model("sdxl"), tmp_path, images, max_train_steps=2,
                                      base_model_precision="nf4-bnb", quantize_via="accelerator"))
    layers = lora_layers(trainer.trained.module)
    assert layers and all(isinstance(layer.get_base_layer(), bnb.nn.Linear4bit) for layer in layers)
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists()


def test_nf4_keeps_float32_modules_and_matches_the_float_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 48))
    model._keep_in_fp32_modules = ["2"]
    inputs = torch.randn(5, 128)
    expected = model(inputs)
    assert quantize_to_nf4(model, torch.device("cpu")) == 1
    assert type(model[2]) is torch.nn.Linear and model.is_loaded_in_4bit
    assert (model(inputs) - expected).abs().max() < 0.1


def test_the_bitsandbytes_requirement_names_the_version_when_the_device_is_unsupported(monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"}, raising=False)
    monkeypatch.setattr(hardware, "local_device_type", lambda: "cpu")
    needs = hardware.unmet("bitsandbytes")
    assert needs is not None and "bitsandbytes package" in needs and "0.46" in needs
    with pytest.raises(ConfigError, match="nf4-bnb needs the bitsandbytes package"):
        quantization.check_level("base_model_precision", "nf4-bnb", Settings({"base_model_precision": "nf4-bnb"}))


def test_lycoris_cannot_wrap_nf4_weights(tmp_path):
    from simpletuner.config.validate import validate_settings

    errors = validate_settings(Settings({"model_family": "sdxl", "max_train_steps": 1, "lora_type": "lycoris",
                                         "base_model_precision": "nf4-bnb"}))
    assert any(error.key == "base_model_precision" and "bitsandbytes" in str(error) for error in errors), errors
