"""End to end on tiny HiDream: train a few steps, save, load the result with HiDreamImagePipeline."""

from __future__ import annotations

import torch

from helpers.runs import base_config, train

IMAGE_COUNT = 4  # sample images in this module's copy (the `images` fixture in tests/conftest.py)


def render(pipeline) -> torch.Tensor:
    # HiDreamImagePipeline renders at a fixed area (128x128 latents, the released models' size); the tiny
    # transformer is sized for 8x8 latents, so render at that (64 px), as the family's build_pipeline does.
    pipeline.default_sample_size = pipeline.transformer.config.max_resolution[0]
    return pipeline("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                    generator=torch.Generator().manual_seed(0), guidance_scale=1.0).images


def test_lora_trains_saves_and_loads_with_load_lora_weights(tiny_model, images, tmp_path):
    from diffusers import HiDreamImagePipeline

    config = base_config("hidream", tiny_model("hidream"), tmp_path, images, lora_alpha=8,
                         caption_dropout_probability=0.5, hidream_use_load_balancing_loss=True)
    assert train(config).global_step == 3
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists()
    pipeline = HiDreamImagePipeline.from_pretrained(tiny_model("hidream"))
    before = render(pipeline)
    pipeline.load_lora_weights(str(tmp_path / "output"))
    adapter = pipeline.transformer.peft_config["default_0"]
    assert (adapter.r, adapter.lora_alpha) == (4, 8), "the saved metadata must carry the trained alpha"
    assert {"to_q", "to_out", "to_q_t", "to_out_t"} <= set(adapter.target_modules)
    assert not torch.allclose(before, render(pipeline)), "the trained LoRA did not change the image"


def test_full_finetune_saves_a_loadable_pipeline(tiny_model, images, tmp_path):
    from diffusers import HiDreamImagePipeline

    config = base_config("hidream", tiny_model("hidream"), tmp_path, images, model_type="full", learning_rate=1e-3,
                         gradient_checkpointing=True)
    assert train(config).global_step == 3
    pipeline = HiDreamImagePipeline.from_pretrained(str(tmp_path / "output"))
    trained = pipeline.transformer.state_dict()
    original = HiDreamImagePipeline.from_pretrained(tiny_model("hidream")).transformer.state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in original), "full fine-tune changed nothing"
    assert any(not torch.equal(trained[k], original[k]) for k in original if ".experts." in k), \
        "the routed experts did not train"
    assert render(pipeline).shape == (1, 3, 64, 64)
