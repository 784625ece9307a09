"""GGUF denoiser files: a tiny transformer written as GGUF (Q8_0 blocks, F32 for the rest) loads through
diffusers' GGUF single-file loader, stays quantised, and a LoRA trains on it."""

from __future__ import annotations

import pytest
import torch

from helpers.gguf_files import transformer_to_gguf
from helpers.lora_checks import lora_layers
from helpers.runs import base_config, run_trainer
from simpletuner.config.settings import Settings
from simpletuner.config.validate import validate_settings
from simpletuner.training import quantization

IMAGE_COUNT = 4

pytest.importorskip("gguf")


@pytest.mark.parametrize("family,class_name", [("flux", "FluxTransformer2DModel"),
                                               ("sd3", "SD3Transformer2DModel"),
                                               ("auraflow", "AuraFlowTransformer2DModel"),
                                               ("lumina2", "Lumina2Transformer2DModel")])
def test_a_lora_trains_on_a_gguf_transformer(family, class_name, tiny_model, images, tmp_path):
    import diffusers
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    model = tiny_model(family)
    model_class = getattr(diffusers, class_name)
    gguf_path = tmp_path / f"{family}-Q8_0.gguf"
    stored = transformer_to_gguf(model, model_class, gguf_path, family)
    assert "Q8_0" in stored.values()
    trainer = run_trainer(base_config(family, model, tmp_path, images, max_train_steps=2,
                                      pretrained_transformer_model_name_or_path=str(gguf_path)))
    assert trainer.state.global_step == 2 and all(torch.isfinite(torch.tensor(trainer.state.loss_history)))
    transformer = trainer.trained.module
    quantised = [layer for layer in transformer.modules() if isinstance(layer, GGUFLinear)
                 and isinstance(layer.weight, GGUFParameter)]
    assert len(quantised) == sum(kind == "Q8_0" for kind in stored.values())
    layers = lora_layers(transformer)
    assert any(isinstance(layer.get_base_layer(), GGUFLinear) for layer in layers)
    assert any(layer.lora_B["default"].weight.abs().sum() > 0 for layer in layers)  # the adapter trained
    float_bytes = quantization.stored_bytes(model_class.from_pretrained(model, subfolder="transformer"))
    lora_bytes = sum(p.numel() * p.element_size() for p in trainer.trainable)
    assert quantization.stored_bytes(transformer) - lora_bytes < 0.6 * float_bytes
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists()


def test_flux_reads_a_gguf_base_model_with_the_flavour_folder_as_architecture(tiny_model, tmp_path, monkeypatch):
    from diffusers import FluxTransformer2DModel
    from diffusers.quantizers.gguf.utils import GGUFLinear

    from simpletuner.models.flux import Flux

    model = tiny_model("flux")
    gguf_path = tmp_path / "flux.gguf"
    transformer_to_gguf(model, FluxTransformer2DModel, gguf_path, "flux")
    monkeypatch.setitem(Flux.flavours, "dev", model)
    family = Flux(Settings({"model_family": "flux", "model_flavour": "dev",
                            "pretrained_model_name_or_path": str(gguf_path)}))
    assert family.config_source() == model
    components = family.load(torch.device("cpu"), torch.float32)
    assert isinstance(components.denoiser.transformer_blocks[0].attn.to_q, GGUFLinear)


def test_an_original_layout_gguf_is_converted_and_computes_like_the_float_model(tiny_model, tmp_path):
    """Published SD3 GGUF files use the original MMDiT names (fused qkv); diffusers converts them on load."""
    from diffusers import GGUFQuantizationConfig, SD3Transformer2DModel
    from diffusers.quantizers.gguf.utils import GGUFParameter

    from helpers.gguf_files import write_gguf
    from helpers.original_layout import sd3_transformer_to_original

    model = tiny_model("sd3")
    reference = SD3Transformer2DModel.from_pretrained(model, subfolder="transformer")
    path = tmp_path / "sd3-original.gguf"
    write_gguf(sd3_transformer_to_original(reference.state_dict(), reference.config.num_layers), path, "sd3")
    loaded = SD3Transformer2DModel.from_single_file(
        str(path), config=model, subfolder="transformer", torch_dtype=torch.float32,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))
    assert isinstance(loaded.transformer_blocks[0].attn.to_q.weight, GGUFParameter)
    config = reference.config
    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, config.in_channels, 8, 8), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 5, config.joint_attention_dim),
                  pooled_projections=torch.randn(1, config.pooled_projection_dim))
    with torch.no_grad():
        expected, actual = reference(**inputs).sample, loaded(**inputs).sample
    assert (expected - actual).abs().max() < 0.05 * expected.abs().max()


def gguf_errors(tmp_path, **values) -> list:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"")
    values = {key: (str(path) if value == "GGUF" else value) for key, value in values.items()}
    return validate_settings(Settings({"max_train_steps": 1, **values}))


@pytest.mark.parametrize("values,option,expected", [
    ({"model_family": "sdxl", "pretrained_unet_model_name_or_path": "GGUF"}, "pretrained_unet_model_name_or_path",
     "cannot read there"),
    ({"model_family": "sd3", "pretrained_model_name_or_path": "GGUF"}, "pretrained_model_name_or_path",
     "give it as pretrained_transformer_model_name_or_path"),
    ({"model_family": "flux", "pretrained_transformer_model_name_or_path": "GGUF",
      "base_model_precision": "int8-quanto"}, "pretrained_transformer_model_name_or_path", "already quantised"),
    ({"model_family": "flux", "pretrained_transformer_model_name_or_path": "GGUF", "model_type": "full"},
     "pretrained_transformer_model_name_or_path", "model_type=full"),
    ({"model_family": "flux", "pretrained_transformer_model_name_or_path": "GGUF", "lora_type": "lycoris"},
     "pretrained_transformer_model_name_or_path", "lora_type=lycoris"),
    ({"model_family": "flux", "pretrained_transformer_model_name_or_path": "/nowhere/flux.gguf"},
     "pretrained_transformer_model_name_or_path", "does not exist"),
])
def test_gguf_settings_that_cannot_work_are_refused(values, option, expected, tmp_path):
    errors = gguf_errors(tmp_path, **values)
    assert any(error.key == option and expected in str(error) for error in errors), errors
