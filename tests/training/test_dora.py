"""DoRA (use_dora): trains through the trainer and the diffusers pipeline loads the result."""

from __future__ import annotations

import torch

from helpers.images import copy_sample_images
from helpers.runs import base_config, train


def test_dora_trains_and_the_pipeline_loads_it(tiny_model, sample_images, tmp_path):
    from safetensors.torch import load_file

    from simpletuner.models.registry import get_family

    model = tiny_model("sdxl")
    copy_sample_images(sample_images, tmp_path / "images", count=2)
    config = base_config("sdxl", model, tmp_path, tmp_path / "images", use_dora=True, max_train_steps=2)
    assert train(config).global_step == 2
    saved = load_file(str(tmp_path / "output" / "pytorch_lora_weights.safetensors"))
    magnitudes = {key: value for key, value in saved.items() if key.endswith("lora_magnitude_vector")}
    assert magnitudes, "a DoRA file carries magnitude vectors"

    pipeline = get_family("sdxl").pipeline_class.from_pretrained(model)
    # DoRA starts each magnitude at the row norms of the base weight; training moves them.
    weights = dict(pipeline.unet.named_parameters())
    moved = [key for key, magnitude in magnitudes.items()
             if not torch.allclose(magnitude.flatten(), _row_norms(weights, key), atol=1e-6)]
    assert moved, "no DoRA magnitude changed during training"

    render = dict(prompt="a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                  guidance_scale=1.0)
    before = pipeline(**render, generator=torch.Generator().manual_seed(0)).images
    pipeline.load_lora_weights(str(tmp_path / "output"))
    assert pipeline.unet.peft_config["default_0"].use_dora
    after = pipeline(**render, generator=torch.Generator().manual_seed(0)).images
    assert not torch.allclose(before, after), "the DoRA adapter did not change the image"


def _row_norms(weights: dict[str, torch.Tensor], magnitude_key: str) -> torch.Tensor:
    layer = magnitude_key[len("unet."):-len(".lora_magnitude_vector")]
    weight = weights[f"{layer}.weight"].detach()
    return weight.reshape(weight.shape[0], -1).norm(dim=1)
