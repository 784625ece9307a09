"""End to end on tiny DeepFloyd IF stage I: pixel caches, LoRA and full training, validation without a VAE."""

from __future__ import annotations

import os
import re

import pytest
from safetensors.torch import load_file
import torch

from helpers.runs import base_config, run_trainer, train

FAMILY = "deepfloyd"
IMAGE_COUNT = 4
VALIDATION = {"validation_prompt": "a red circle", "validation_resolution": "32,48x32",
              "validation_num_inference_steps": 1, "validation_step_interval": 100,
              "validation_disable_unconditional": True, "disable_benchmark": True}


def render(pipeline) -> torch.Tensor:
    return pipeline("a red circle", num_inference_steps=2, height=32, width=32, output_type="pt",
                    generator=torch.Generator().manual_seed(0), guidance_scale=1.0, clean_caption=False).images


@pytest.fixture(scope="module")
def lora_run(tiny_model, images, tmp_path_factory):
    """Three LoRA steps with soft min-SNR weighting, and a validation round at the end."""
    root = tmp_path_factory.mktemp("deepfloyd-lora")
    config = base_config(FAMILY, tiny_model(FAMILY), root, images, use_soft_min_snr=True, snr_gamma=5.0,
                         **VALIDATION)
    return run_trainer(config), root / "output"


def test_lora_trains_saves_and_changes_the_output(lora_run, tiny_model):
    from diffusers import IFPipeline

    trainer, output = lora_run
    assert trainer.state.global_step == 3
    pipeline = IFPipeline.from_pretrained(tiny_model(FAMILY))
    pipeline.set_progress_bar_config(disable=True)
    before = render(pipeline)
    pipeline.load_lora_weights(str(output))
    assert not torch.allclose(before, render(pipeline)), "the trained LoRA did not change the image"
    # Every trained layer (attention and the added text key/value projections) arrives with its values.
    saved = load_file(str(output / "pytorch_lora_weights.safetensors"))
    loaded = {re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", name): value  # drop the adapter name
              for name, value in pipeline.unet.state_dict().items() if ".lora_" in name}
    assert {"unet." + name for name in loaded} == set(saved)
    assert any(".add_k_proj." in key for key in saved) and any(".to_q." in key for key in saved)
    assert all(torch.equal(saved["unet." + name], value) for name, value in loaded.items())


def test_the_latent_cache_holds_the_training_pixels(lora_run):
    from simpletuner.data.transforms import load_pixels

    trainer, _ = lora_run
    prepared = trainer.data.next_batch()
    storage = trainer.data.datasets["shapes"].storage
    for record, latents in zip(prepared.records, prepared.batch.latents):
        assert latents.shape == (3, 64, 64)
        assert torch.allclose(latents, load_pixels(record, storage).float(), atol=1e-6)


def test_validation_renders_pixels_at_each_size(lora_run):
    _, output = lora_run
    names = sorted(os.listdir(output / "validation_images"))
    assert names == ["step000003_validation_32x32_0.png", "step000003_validation_48x32_0.png"]


def test_full_finetune_saves_a_loadable_pipeline(tiny_model, images, tmp_path):
    from diffusers import IFPipeline

    config = base_config(FAMILY, tiny_model(FAMILY), tmp_path, images, model_type="full", learning_rate=1e-3)
    assert train(config).global_step == 3
    pipeline = IFPipeline.from_pretrained(str(tmp_path / "output"))
    assert pipeline.safety_checker is None and pipeline.watermarker is None
    assert pipeline.scheduler.config.variance_type == "fixed_small"
    trained = pipeline.unet.state_dict()
    original = IFPipeline.from_pretrained(tiny_model(FAMILY)).unet.state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in original), "full fine-tune changed nothing"
    pipeline.set_progress_bar_config(disable=True)
    assert render(pipeline).shape == (1, 3, 32, 32)


def test_stage_ii_lora_trains_upscales_dataset_images_and_loads(images, tmp_path):
    from diffusers import IFSuperResolutionPipeline
    from PIL import Image

    from simpletuner.models.tiny.deepfloyd import build_stage_ii

    model = tmp_path / "stage-ii"
    torch.manual_seed(0)
    build_stage_ii().save_pretrained(model, safe_serialization=True)
    config = base_config(FAMILY, model, tmp_path, images, model_flavour="ii-medium-450m",
                         validation_using_datasets=True, num_eval_images=1, validation_num_inference_steps=2,
                         validation_step_interval=100, disable_benchmark=True)
    assert train(config).global_step == 3
    rendered = [name for name in os.listdir(tmp_path / "output" / "validation_images") if name.endswith(".png")]
    assert len(rendered) == 1 and rendered[0].startswith("step000003_shapes_")
    pipeline = IFSuperResolutionPipeline.from_pretrained(str(model))
    pipeline.set_progress_bar_config(disable=True)
    low_resolution = Image.new("RGB", (16, 16), (200, 30, 60))

    def upscale():
        return pipeline("a red circle", image=low_resolution, num_inference_steps=2, height=64, width=64,
                        output_type="pt", generator=torch.Generator().manual_seed(0), guidance_scale=1.0,
                        clean_caption=False).images

    before = upscale()
    pipeline.load_lora_weights(str(tmp_path / "output"))
    assert not torch.allclose(before, upscale()), "the trained stage II LoRA did not change the upscale"
