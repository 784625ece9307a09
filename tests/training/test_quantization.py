"""Quantised frozen weights after loading (quantize_via=cpu/accelerator): quanto, torchao and bitsandbytes
bases that still carry a training LoRA, and the refusals."""

from __future__ import annotations

import pytest
import torch

from helpers.lora_checks import lora_layers, lora_trained
from helpers.runs import base_config, run_trainer
from simpletuner.config import hardware
from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.config.validate import validate_settings
from simpletuner.models.base import Components
from simpletuner.models.sdxl import StableDiffusionXL
from simpletuner.training import quantization


IMAGE_COUNT = 4  # sample images in this module's copy (the `images` fixture in tests/conftest.py)


def test_int8_quanto_lora_trains_on_a_quantised_sdxl(tiny_model, images, tmp_path):
    from diffusers import UNet2DConditionModel
    from optimum.quanto import QModuleMixin, WeightQBytesTensor

    model = tiny_model("sdxl")
    trainer = run_trainer(base_config("sdxl", model, tmp_path, images, max_train_steps=2,
                                      base_model_precision="int8-quanto", text_encoder_1_precision="int8-quanto"))
    assert trainer.state.global_step == 2 and all(torch.isfinite(torch.tensor(trainer.state.loss_history)))
    unet = trainer.trained.module
    layers = lora_layers(unet)
    assert layers and all(isinstance(layer.get_base_layer(), QModuleMixin) for layer in layers)
    assert isinstance(layers[0].get_base_layer().weight, WeightQBytesTensor)
    assert lora_trained(trainer.trained.module)
    float_bytes = quantization.stored_bytes(UNet2DConditionModel.from_pretrained(model, subfolder="unet"))
    lora_bytes = sum(p.numel() * p.element_size() for p in trainer.trainable)
    assert quantization.stored_bytes(unet) - lora_bytes < 0.5 * float_bytes
    encoder = trainer.components.text_encoders[0]
    assert any(isinstance(module, QModuleMixin) for module in encoder.modules())
    assert not any(isinstance(module, QModuleMixin) for module in trainer.components.text_encoders[1].modules())
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists()


def test_int8_torchao_lora_trains_on_a_quantised_sdxl(tiny_model, images, tmp_path):
    from peft.tuners.lora.torchao import TorchaoLoraLinear
    from torchao.utils import TorchAOBaseTensor

    trainer = run_trainer(base_config("sdxl", tiny_model("sdxl"), tmp_path, images, max_train_steps=2,
                                      base_model_precision="int8-torchao"))
    layers = lora_layers(trainer.trained.module)
    assert layers and all(isinstance(layer, TorchaoLoraLinear) for layer in layers)
    weight = layers[0].get_base_layer().weight
    assert isinstance(weight, TorchAOBaseTensor) and weight.qdata.dtype == torch.int8
    assert lora_trained(trainer.trained.module)


def test_int8_quanto_lora_trains_on_a_quantised_flux(tiny_model, images, tmp_path):
    from optimum.quanto import QModuleMixin

    trainer = run_trainer(base_config("flux", tiny_model("flux"), tmp_path, images, max_train_steps=2,
                                      base_model_precision="int8-quanto", text_encoder_2_precision="int8-quanto"))
    layers = lora_layers(trainer.trained.module)
    assert layers and all(isinstance(layer.get_base_layer(), QModuleMixin) for layer in layers)
    assert any(isinstance(module, QModuleMixin) for module in trainer.components.text_encoders[1].modules())
    assert lora_trained(trainer.trained.module)


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))


@pytest.mark.parametrize("level", ["int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto", "fp8uz-quanto",
                                   "int8-torchao", "fp8-torchao", "nf4-bnb"])
def test_every_cpu_level_really_quantises(level):
    """fp8-torchao is gated to FP8 GPUs for training speed; its weight conversion itself runs anywhere.
    nf4-bnb runs here because the installed bitsandbytes supports the CPU."""
    if level == "nf4-bnb" and hardware.unmet("bitsandbytes"):
        pytest.skip("the installed bitsandbytes does not run on this device")
    model = small_model()
    inputs = torch.randn(4, 64)
    expected = model(inputs)
    before = quantization.stored_bytes(model)
    quantization.quantize_module(model, level, "cpu", torch.device("cpu"))
    assert type(model[0].weight) not in (torch.Tensor, torch.nn.Parameter)
    assert quantization.stored_bytes(model) < 0.4 * before  # 8 bits or fewer per weight, plus scales
    error = (model(inputs) - expected).abs().max().item()
    assert error < (1.5 if level == "int2-quanto" else 0.2)


def test_lower_bit_levels_store_fewer_bytes():
    sizes = {}
    for level in ("int8-quanto", "int4-quanto", "int2-quanto"):
        model = small_model()
        quantization.quantize_module(model, level, "accelerator", torch.device("cpu"))
        sizes[level] = quantization.stored_bytes(model)
    assert sizes["int2-quanto"] < sizes["int4-quanto"] < sizes["int8-quanto"]


def components_for(settings: Settings, encoders: int = 1) -> tuple:
    """SDXL's component names over small stand-in modules (the denoiser and ``encoders`` text encoders)."""
    family = StableDiffusionXL
    components = Components(denoiser=small_model(), vae=None, text_encoders=[small_model() for _ in range(encoders)])
    return family, components


def test_full_finetune_refuses_a_quantised_base():
    settings = Settings({"model_type": "full", "base_model_precision": "int8-quanto"})
    with pytest.raises(ConfigError, match="model_type=full") as raised:
        quantization.quantize_components(*components_for(settings), settings, torch.device("cpu"))
    assert raised.value.key == "base_model_precision"


def test_a_controlnet_run_quantises_its_frozen_denoiser():
    settings = Settings({"model_type": "full", "controlnet": True, "base_model_precision": "int8-quanto"})
    family, components = components_for(settings)
    quantization.quantize_components(family, components, settings, torch.device("cpu"))
    assert type(components.denoiser[0].weight) is not torch.nn.Parameter


def test_lycoris_cannot_add_to_torchao_weights():
    settings = Settings({"lora_type": "lycoris", "base_model_precision": "int8-torchao"})
    with pytest.raises(ConfigError, match="cannot take. Use int8-quanto"):
        quantization.quantize_components(*components_for(settings), settings, torch.device("cpu"))


def test_text_encoder_levels_must_name_an_existing_encoder():
    settings = Settings({"text_encoder_3_precision": "int8-quanto"})
    with pytest.raises(ConfigError, match="has 2 text encoder"):
        quantization.quantize_components(*components_for(settings, encoders=2), settings, torch.device("cpu"))


def test_base_rewriting_lora_inits_are_refused():
    settings = Settings({"base_model_precision": "int8-quanto", "lora_init_type": "pissa"})
    with pytest.raises(ConfigError, match="rewrites the base weights"):
        quantization.quantize_components(*components_for(settings), settings, torch.device("cpu"))


def test_only_the_named_text_encoder_is_quantised():
    settings = Settings({"text_encoder_2_precision": "int8-quanto"})
    family, components = components_for(settings, encoders=2)
    quantization.quantize_components(family, components, settings, torch.device("cpu"))
    first, second = components.text_encoders
    assert type(first[0].weight) is torch.nn.Parameter and type(second[0].weight) is not torch.nn.Parameter
    assert type(components.denoiser[0].weight) is torch.nn.Parameter


GATED = [(name, level, key) for name in ("base_model_precision", "text_encoder_1_precision")
         for level, key in (("int4-torchao", "cuda"), ("fp8-torchao", "cuda_fp8"))]


@pytest.mark.parametrize("option,level,requirement", GATED)
def test_hardware_levels_are_refused_with_their_requirement(option, level, requirement):
    needs = hardware.unmet(requirement)
    if needs is None:
        pytest.skip(f"this machine has {requirement}")
    errors = validate_settings(Settings({option: level, "max_train_steps": 1}))
    assert any(error.key == option and needs in str(error) for error in errors), errors
    with pytest.raises(ConfigError, match="needs " + needs.split(" (")[0]):
        quantization.check_level(option, level, Settings({option: level}))


def test_no_quantisation_choice_is_left_unbuilt():
    for values in ({"base_model_precision": "nf4-bnb"}, {"quantize_via": "pipeline"},
                   {"quantization_config": '{"default": {"weights_dtype": "int8"}}', "quantize_via": "pipeline"}):
        errors = validate_settings(Settings({**values, "max_train_steps": 1, "model_family": "sdxl"}))
        assert not any("not implemented yet" in str(error) for error in errors), errors
