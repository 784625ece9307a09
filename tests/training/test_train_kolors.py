"""End to end on tiny Kolors: train 3 steps, save, load the result with diffusers' KolorsPipeline."""

from __future__ import annotations

import torch

from helpers.runs import base_config, train

IMAGE_COUNT = 4
VALIDATION = {"validation_prompt": "a red circle", "validation_resolution": "64", "num_validation_images": 1,
              "validation_num_inference_steps": 2, "validation_guidance": 4.5, "validation_step_interval": 3}


def render(pipeline) -> torch.Tensor:
    return pipeline("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                    generator=torch.Generator().manual_seed(0), guidance_scale=1.0).images


def test_lora_trains_validates_saves_and_changes_the_output(tiny_model, images, tmp_path):
    from diffusers import KolorsPipeline

    state = train(base_config("kolors", tiny_model("kolors"), tmp_path, images, **VALIDATION))
    assert state.global_step == 3
    assert list((tmp_path / "output" / "validation_images").glob("*.png")), "validation rendered nothing"
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists()
    pipeline = KolorsPipeline.from_pretrained(tiny_model("kolors"))
    before = render(pipeline)
    pipeline.load_lora_weights(str(tmp_path / "output"))
    assert not torch.allclose(before, render(pipeline)), "the trained LoRA did not change the image"


def test_full_finetune_saves_a_loadable_pipeline(tiny_model, images, tmp_path):
    from diffusers import KolorsPipeline

    config = base_config("kolors", tiny_model("kolors"), tmp_path, images, model_type="full", learning_rate=1e-3)
    assert train(config).global_step == 3
    pipeline = KolorsPipeline.from_pretrained(str(tmp_path / "output"))
    trained = pipeline.unet.state_dict()
    original = KolorsPipeline.from_pretrained(tiny_model("kolors")).unet.state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in original), "full fine-tune changed nothing"
    assert render(pipeline).shape == (1, 3, 64, 64)
