"""End to end on tiny Qwen-Image: train a few steps, save, load the result with QwenImagePipeline."""

from __future__ import annotations

import pytest
import torch

from helpers.gguf_files import transformer_to_gguf
from helpers.lora_checks import lora_layers
from helpers.runs import base_config, run_trainer, train

IMAGE_COUNT = 4  # sample images in this module's copy (the `images` fixture in tests/conftest.py)


def render(pipeline) -> torch.Tensor:
    return pipeline("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images


def test_lora_trains_saves_and_changes_the_output(tiny_model, images, tmp_path):
    from diffusers import QwenImagePipeline

    # Batches of two captions of different lengths: the cached masks are padded together.
    config = base_config("qwen_image", tiny_model("qwen_image"), tmp_path, images, lora_alpha=8,
                         caption_dropout_probability=0.5)
    assert train(config).global_step == 3
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists()
    pipeline = QwenImagePipeline.from_pretrained(tiny_model("qwen_image"))
    before = render(pipeline)
    pipeline.load_lora_weights(str(tmp_path / "output"))
    adapter = pipeline.transformer.peft_config["default_0"]
    assert (adapter.r, adapter.lora_alpha) == (4, 8), "the saved metadata must carry the trained alpha"
    assert not torch.allclose(before, render(pipeline)), "the trained LoRA did not change the image"


def test_full_finetune_saves_a_loadable_pipeline(tiny_model, images, tmp_path):
    from diffusers import QwenImagePipeline

    config = base_config("qwen_image", tiny_model("qwen_image"), tmp_path, images, model_type="full",
                         learning_rate=1e-3, gradient_checkpointing=True, max_train_steps=2)
    assert train(config).global_step == 2
    pipeline = QwenImagePipeline.from_pretrained(str(tmp_path / "output"))
    trained = pipeline.transformer.state_dict()
    original = QwenImagePipeline.from_pretrained(tiny_model("qwen_image")).transformer.state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in original), "full fine-tune changed nothing"
    assert render(pipeline).shape == (1, 3, 64, 64)


def test_a_lora_trains_on_a_gguf_transformer(tiny_model, images, tmp_path):
    """pretrained_transformer_model_name_or_path may name a .gguf file (QUANTISATION.md); it stays quantised."""
    pytest.importorskip("gguf")
    from diffusers import QwenImageTransformer2DModel
    from diffusers.quantizers.gguf.utils import GGUFLinear

    model = tiny_model("qwen_image")
    gguf_path = tmp_path / "qwen_image-Q8_0.gguf"
    assert "Q8_0" in transformer_to_gguf(model, QwenImageTransformer2DModel, gguf_path, "qwen_image").values()
    trainer = run_trainer(base_config("qwen_image", model, tmp_path, images, max_train_steps=2,
                                      pretrained_transformer_model_name_or_path=str(gguf_path)))
    assert trainer.state.global_step == 2
    layers = lora_layers(trainer.trained.module)
    assert layers and all(isinstance(layer.get_base_layer(), GGUFLinear) for layer in layers)
    assert any(layer.lora_B["default"].weight.abs().sum() > 0 for layer in layers)
