"""End to end on a tiny LTX-Video: train 3 steps on still images (one-frame videos), save, load with LTXPipeline."""

from __future__ import annotations

import torch

from helpers.runs import base_config, train
from simpletuner.config.settings import Settings
from simpletuner.models.registry import get_family

FAMILY = "ltxvideo"
VALIDATION = {"validation_prompt": "a red circle", "validation_resolution": "64", "num_validation_images": 1,
              "validation_num_inference_steps": 2, "validation_guidance": 3.0, "validation_step_interval": 3}


def render(pipeline) -> torch.Tensor:
    arguments = get_family(FAMILY)(Settings({"model_family": FAMILY})).pipeline_call_arguments()
    return pipeline("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                    generator=torch.Generator().manual_seed(0), guidance_scale=1.0, **arguments).frames


def test_lora_trains_validates_saves_and_loads_with_ltxpipeline(tiny_model, images, tmp_path):
    state = train(base_config(FAMILY, tiny_model(FAMILY), tmp_path, images, **VALIDATION))
    assert state.global_step == 3
    assert list((tmp_path / "output" / "validation_images").glob("*.png")), "validation rendered nothing"
    pipeline = get_family(FAMILY).pipeline_class.from_pretrained(tiny_model(FAMILY))
    before = render(pipeline)
    pipeline.load_lora_weights(str(tmp_path / "output"))
    assert not torch.allclose(before, render(pipeline)), "the trained LoRA did not change the image"


def test_full_finetune_saves_a_loadable_pipeline(tiny_model, images, tmp_path):
    config = base_config(FAMILY, tiny_model(FAMILY), tmp_path, images, model_type="full", learning_rate=1e-3)
    assert train(config).global_step == 3
    pipeline_class = get_family(FAMILY).pipeline_class
    pipeline = pipeline_class.from_pretrained(str(tmp_path / "output"))
    trained = pipeline.transformer.state_dict()
    original = pipeline_class.from_pretrained(tiny_model(FAMILY)).transformer.state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in original), "full fine-tune changed nothing"
    assert render(pipeline).shape == (1, 1, 3, 64, 64)
