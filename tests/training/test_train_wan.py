"""End to end on tiny Wan 2.1: train 3 steps on images (one-frame videos), save, load the result with WanPipeline."""

from __future__ import annotations

import torch

from helpers.runs import base_config, train
from simpletuner.models.registry import get_family
from simpletuner.config.settings import Settings

FAMILY = "wan"


def render(pipeline) -> torch.Tensor:
    """A one-frame video of 32px, as validation renders it: (1, 3, 32, 32)."""
    arguments = get_family(FAMILY)(Settings({"model_family": FAMILY})).pipeline_call_arguments()
    result = pipeline("a red circle", num_inference_steps=2, height=32, width=32, output_type="pt",
                      generator=torch.Generator().manual_seed(0), guidance_scale=1.0, **arguments)
    return result.frames[0]


def test_lora_trains_saves_and_loads_with_wan_pipeline(tiny_model, images, tmp_path):
    config = base_config(FAMILY, tiny_model(FAMILY), tmp_path, images, resolution=32, validation_prompt="a red circle",
                         validation_steps=3, num_validation_images=1, validation_num_inference_steps=2,
                         validation_resolution=32)
    state = train(config)
    assert state.global_step == 3
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists()
    pipeline = get_family(FAMILY).pipeline_class.from_pretrained(tiny_model(FAMILY))
    before = render(pipeline)
    pipeline.load_lora_weights(str(tmp_path / "output"))
    after = render(pipeline)
    assert not torch.allclose(before, after), "the trained LoRA did not change the image"
    saved = list((tmp_path / "output").rglob("*.png"))
    assert saved, "validation saved no image"


def test_full_finetune_saves_a_loadable_pipeline(tiny_model, images, tmp_path):
    config = base_config(FAMILY, tiny_model(FAMILY), tmp_path, images, model_type="full", learning_rate=1e-3,
                         resolution=32)
    assert train(config).global_step == 3
    pipeline_class = get_family(FAMILY).pipeline_class
    pipeline = pipeline_class.from_pretrained(str(tmp_path / "output"))
    trained = pipeline.transformer.state_dict()
    original = pipeline_class.from_pretrained(tiny_model(FAMILY)).transformer.state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in original), "full fine-tune changed nothing"
    assert render(pipeline).shape == (1, 3, 32, 32)
