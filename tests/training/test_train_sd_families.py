"""End to end on the tiny UNet families: train, save, and load the result with diffusers."""

from __future__ import annotations

import pytest
import torch

from helpers.images import copy_sample_images
from helpers.runs import base_config, train

FAMILIES = ["sd1x", "sd2x", "sdxl"]


def render(pipeline) -> torch.Tensor:
    result = pipeline("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                      generator=torch.Generator().manual_seed(0), guidance_scale=1.0)
    return result.images


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_saves_and_changes_the_output(family, tiny_model, images, tmp_path):
    from simpletuner.models.registry import get_family

    config = base_config(family, tiny_model(family), tmp_path, images)
    state = train(config)
    assert state.global_step == 3
    lora_file = tmp_path / "output" / "pytorch_lora_weights.safetensors"
    assert lora_file.exists()
    pipeline_class = get_family(family).pipeline_class
    pipeline = pipeline_class.from_pretrained(tiny_model(family))
    before = render(pipeline)
    pipeline.load_lora_weights(str(tmp_path / "output"))
    after = render(pipeline)
    assert not torch.allclose(before, after), "the trained LoRA did not change the image"


def test_lora_on_layers_beyond_attention_loads_every_layer(tiny_model, images, tmp_path):
    """A LoRA on proj_in besides to_q is saved in one key layout, so diffusers applies both kinds of layer."""
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    config = base_config("sdxl", tiny_model("sdxl"), tmp_path, images,
                         peft_lora_target_modules='["to_q", "proj_in"]')
    train(config)
    saved = load_file(str(tmp_path / "output" / "pytorch_lora_weights.safetensors"))
    assert any(".proj_in." in key for key in saved) and any(".to_q." in key for key in saved)
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_model("sdxl"))
    pipeline.load_lora_weights(str(tmp_path / "output"))
    wrapped = {name.rsplit(".", 1)[-1] for name, module in pipeline.unet.named_modules()
               if isinstance(module, LoraLayer)}
    assert wrapped == {"to_q", "proj_in"}
    loaded_a = [module.lora_A["default_0"].weight for module in pipeline.unet.modules() if isinstance(module, LoraLayer)]
    assert len(loaded_a) == sum(1 for key in saved if "lora_A" in key or "lora.down" in key)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_finetune_saves_a_loadable_pipeline(family, tiny_model, images, tmp_path):
    from simpletuner.models.registry import get_family

    config = base_config(family, tiny_model(family), tmp_path, images, model_type="full", learning_rate=1e-3)
    train(config)
    pipeline = get_family(family).pipeline_class.from_pretrained(str(tmp_path / "output"))
    trained = pipeline.unet.state_dict()
    original = get_family(family).pipeline_class.from_pretrained(tiny_model(family)).unet.state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in original), "full fine-tune changed nothing"
    assert render(pipeline).shape[-1] == 64


def test_sd2x_trains_with_v_prediction(tiny_model, images, tmp_path):
    from simpletuner.config.settings import Settings
    from simpletuner.models.registry import get_family

    family = get_family("sd2x")(Settings({"pretrained_model_name_or_path": tiny_model("sd2x")}))
    assert family.prediction_type() == "v_prediction"


def test_overfitting_four_images_lowers_the_loss(tiny_model, sample_images, tmp_path):
    copy_sample_images(sample_images, tmp_path / "four", count=4)
    config = base_config("sdxl", tiny_model("sdxl"), tmp_path, tmp_path / "four", model_type="full",
                         max_train_steps=120, learning_rate=1e-3, train_batch_size=2)
    losses = train(config).loss_history
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first * 0.7, f"loss did not fall: first 10 {first:.4f}, last 10 {last:.4f}"
