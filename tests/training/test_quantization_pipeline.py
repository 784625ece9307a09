"""quantize_via=pipeline: the family loaders quantise the denoiser (diffusers) and text encoders
(transformers) while reading them, quantization_config overrides that per component, and settings that
cannot work are refused when the config is validated."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.lora_checks import lora_layers, lora_trained
from helpers.runs import base_config, run_trainer
from simpletuner.config import hardware
from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.config.validate import validate_settings
from simpletuner.models.flux import Flux
from simpletuner.models.load_quantization import loader_quantised
from simpletuner.models.quantization_plan import plan
from simpletuner.models.registry import get_family
from simpletuner.training import quantization

IMAGE_COUNT = 4
CPU = torch.device("cpu")


def pipeline_flux(model: str, **values) -> Flux:
    return Flux(Settings({"model_family": "flux", "pretrained_model_name_or_path": model,
                          "quantize_via": "pipeline", **values}))


# --- loading quantised, then training ---------------------------------------------------------------
def test_quanto_levels_quantise_flux_while_loading_and_a_lora_trains(tiny_model, images, tmp_path):
    from diffusers import FluxTransformer2DModel
    from optimum.quanto import QLinear

    model = tiny_model("flux")
    trainer = run_trainer(base_config("flux", model, tmp_path, images, max_train_steps=2, quantize_via="pipeline",
                                      base_model_precision="int8-quanto", text_encoder_2_precision="int8-quanto"))
    transformer = trainer.trained.module
    assert loader_quantised(transformer)  # diffusers' QuantoConfig did it, not the setup step
    layers = lora_layers(transformer)
    assert layers and all(isinstance(layer.get_base_layer(), QLinear) for layer in layers)
    assert lora_trained(transformer)
    float_bytes = quantization.stored_bytes(FluxTransformer2DModel.from_pretrained(model, subfolder="transformer"))
    lora_bytes = sum(p.numel() * p.element_size() for p in trainer.trainable)
    assert quantization.stored_bytes(transformer) - lora_bytes < 0.5 * float_bytes
    clip, t5 = trainer.components.text_encoders
    assert loader_quantised(t5) and any(isinstance(module, QLinear) for module in t5.modules())
    assert not loader_quantised(clip)
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists()


def test_torchao_level_quantises_sdxl_while_loading_and_a_lora_trains(tiny_model, images, tmp_path):
    from peft.tuners.lora.torchao import TorchaoLoraLinear
    from torchao.utils import TorchAOBaseTensor

    trainer = run_trainer(base_config("sdxl", tiny_model("sdxl"), tmp_path, images, max_train_steps=2,
                                      quantize_via="pipeline", base_model_precision="int8-torchao"))
    unet = trainer.trained.module
    assert loader_quantised(unet)
    layers = lora_layers(unet)
    assert layers and all(isinstance(layer, TorchaoLoraLinear) for layer in layers)
    weight = layers[0].get_base_layer().weight
    assert isinstance(weight, TorchAOBaseTensor) and weight.qdata.dtype == torch.int8
    assert lora_trained(unet)


def test_quantization_config_overrides_each_component(tiny_model):
    """The level's preset takes the transformer entry's keywords; the CLIP entry picks its own backend;
    the T5 level runs through transformers' bitsandbytes loader, which works on the CPU."""
    from optimum.quanto import QLinear
    from torchao.utils import TorchAOBaseTensor

    overrides = {"transformer": {"modules_to_not_convert": ["proj_out"]},
                 "text_encoder": {"quant_method": "torchao", "quant_type": "Int8WeightOnlyConfig"}}
    te2_level = "nf4-bnb" if hardware.unmet("bitsandbytes") is None else "no_change"
    family = pipeline_flux(tiny_model("flux"), base_model_precision="int8-quanto",
                           text_encoder_2_precision=te2_level, quantization_config=json.dumps(overrides))
    components = family.load(CPU, torch.float32)
    quantization.quantize_components(family, components, family.settings, CPU)
    transformer = components.denoiser
    assert isinstance(transformer.transformer_blocks[0].attn.to_q, QLinear)
    assert type(transformer.proj_out) is torch.nn.Linear  # kept out by modules_to_not_convert
    clip_weights = [module.weight for module in components.text_encoders[0].modules()
                    if isinstance(module, torch.nn.Linear)]
    assert clip_weights and all(isinstance(weight, TorchAOBaseTensor) for weight in clip_weights)
    if te2_level == "nf4-bnb":
        import bitsandbytes as bnb

        assert any(isinstance(module, bnb.nn.Linear4bit) for module in components.text_encoders[1].modules())
        assert family.encode_text(["a red square"])["prompt_embeds"].isfinite().all()


@pytest.mark.parametrize("family", ["sd1x", "sdxl", "sd3", "auraflow", "pixart_sigma", "sana", "lumina2", "flux"])
def test_every_family_quantises_its_denoiser_and_last_text_encoder_while_loading(family, tiny_model):
    from helpers.families import make_family

    last = len(get_family(family).text_encoder_attributes)
    model = make_family({family: tiny_model(family)}, family, quantize_via="pipeline",
                        base_model_precision="int8-quanto", **{f"text_encoder_{last}_precision": "int8-quanto"})
    components = model.load(CPU, torch.float32)
    quantization.quantize_components(model, components, model.settings, CPU)
    assert loader_quantised(components.denoiser) and loader_quantised(components.text_encoders[-1])
    assert len(components.text_encoders) == 1 or not loader_quantised(components.text_encoders[0])


def test_a_single_file_denoiser_is_not_quantised_while_loading(tmp_path):
    """diffusers' from_single_file drops quanto weights and leaves torchao configs unapplied, so it is refused."""
    path = tmp_path / "finetune.safetensors"
    path.write_bytes(b"")
    errors = validation_errors(pretrained_transformer_model_name_or_path=str(path), quantize_via="pipeline",
                               base_model_precision="int8-torchao")
    assert any(error.key == "quantize_via" and "single file" in str(error) for error in errors), errors


def test_an_encoder_inside_a_single_file_checkpoint_cannot_be_quantised_while_loading(tiny_model, tmp_path,
                                                                                       monkeypatch):
    """SD3's single-file pipeline reads the T5 in the file without a quantization config; the setup step says so.
    The CLIP encoders the file lacks load from the flavour's folder, quantised."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import save_file

    from helpers.original_layout import sd3_transformer_to_original, vae_to_original  # original-layout keys
    from simpletuner.models.sd3 import StableDiffusion3

    model = tiny_model("sd3")
    reference = StableDiffusion3Pipeline.from_pretrained(model)
    state = sd3_transformer_to_original(reference.transformer.state_dict(), reference.transformer.config.num_layers)
    state.update(vae_to_original(reference.vae.state_dict(), len(reference.vae.config.up_block_types)))
    state.update({f"text_encoders.t5xxl.transformer.{key}": value
                  for key, value in reference.text_encoder_3.state_dict().items()})
    path = str(tmp_path / "tiny-sd3.safetensors")
    save_file({key: value.clone().contiguous() for key, value in state.items()}, path)
    monkeypatch.setitem(StableDiffusion3.flavours, "medium", model)
    family = StableDiffusion3(Settings({"model_family": "sd3", "pretrained_model_name_or_path": path,
                                        "quantize_via": "pipeline", "text_encoder_1_precision": "int8-quanto",
                                        "text_encoder_3_precision": "int8-quanto"}))
    components = family.load(CPU, torch.float32)
    assert loader_quantised(components.text_encoders[0]) and not loader_quantised(components.text_encoders[2])
    with pytest.raises(ConfigError, match="single-file checkpoint") as raised:
        quantization.quantize_components(family, components, family.settings, CPU)
    assert raised.value.key == "text_encoder_3_precision"


# --- how quantization_config resolves ----------------------------------------------------------------
def planned(**values) -> dict:
    return plan(Settings({"quantize_via": "pipeline", **values}), Flux)


def test_an_entry_for_the_levels_backend_merges_into_its_preset():
    result = planned(base_model_precision="int8-torchao",
                     quantization_config='{"transformer": {"quant_type": {"version": 2}}}')
    assert result["transformer"].backend == "torchao"
    assert result["transformer"].options["quant_type"] == {"type": "Int8WeightOnlyConfig", "version": 2}


def test_an_entry_for_another_backend_replaces_the_preset_and_default_fills_the_rest():
    result = planned(base_model_precision="int8-torchao", quantization_config=json.dumps(
        {"transformer": {"weights_dtype": "int4"}, "default": {"quant_method": "quanto", "weights_dtype": "int8"}}))
    assert (result["transformer"].backend, result["transformer"].options) == ("quanto", {"weights_dtype": "int4"})
    assert result["text_encoder"].options == result["text_encoder_2"].options == {"weights_dtype": "int8"}


def test_quantization_config_may_be_a_file(tmp_path):
    path = tmp_path / "quant.json"
    path.write_text('{"text_encoder_2": {"load_in_4bit": true}}')
    result = planned(quantization_config=str(path))
    assert list(result) == ["text_encoder_2"] and result["text_encoder_2"].backend == "bitsandbytes"


# --- refusals at validation time -----------------------------------------------------------------------
def validation_errors(**values) -> list[ConfigError]:
    return validate_settings(Settings({"model_family": "flux", "max_train_steps": 1, **values}))


@pytest.mark.parametrize("config,expected", [
    ("{not json", "is not valid JSON"),
    ("missing.json", "neither inline JSON nor an existing file"),
    ('{"unet": {"weights_dtype": "int8"}}', "names component 'unet'"),
    ('{"transformer": {"quant_method": "gptq"}}', "quant_method='gptq'"),
    ('{"transformer": {"modules_to_not_convert": ["x"]}}', "does not say which backend"),
    ('{"transformer": {"weights_dtype": "int8", "load_in_4bit": true}}', "mixes keywords"),
    ('{"transformer": {"weights_dtype": "int8", "weight_dtype": "int4"}}', "does not take weight_dtype"),
    ('{"text_encoder": {"quant_type": "Int9Config"}}', "not a torchao.quantization config class"),
])
def test_bad_quantization_config_is_refused_naming_the_option(config, expected):
    errors = validation_errors(quantize_via="pipeline", quantization_config=config)
    assert any(error.key == "quantization_config" and expected in str(error) for error in errors), errors


def test_quantization_config_needs_quantize_via_pipeline():
    errors = validation_errors(quantization_config='{"transformer": {"weights_dtype": "int8"}}')
    assert any("set quantize_via=pipeline" in str(error) for error in errors), errors


def test_bitsandbytes_denoiser_loading_names_the_gpu_it_needs():
    needs = hardware.unmet("bitsandbytes_loader")
    if needs is None:
        pytest.skip("this machine has a GPU diffusers' bitsandbytes loader accepts")
    errors = validation_errors(quantize_via="pipeline", base_model_precision="nf4-bnb")
    assert any(error.key == "base_model_precision" and needs in str(error) for error in errors), errors
    if hardware.unmet("bitsandbytes") is None:  # transformers' loader quantises text encoders on the CPU too
        errors = validation_errors(quantize_via="pipeline", text_encoder_2_precision="nf4-bnb")
        assert not any(error.key == "text_encoder_2_precision" for error in errors), errors


def test_a_controlnet_cannot_be_copied_from_a_denoiser_quantised_while_loading():
    errors = validate_settings(Settings({"model_family": "sdxl", "max_train_steps": 1, "controlnet": True,
                                         "quantize_via": "pipeline", "base_model_precision": "int8-quanto"}))
    assert any("copies its ControlNet" in str(error) for error in errors), errors


def test_trained_text_encoders_cannot_be_quantised_by_a_default_entry():
    errors = validate_settings(Settings({"model_family": "sdxl", "max_train_steps": 1, "train_text_encoder": True,
                                         "quantize_via": "pipeline",
                                         "quantization_config": '{"default": {"weights_dtype": "int8"}}'}))
    assert any("train_text_encoder=true" in str(error) for error in errors), errors
