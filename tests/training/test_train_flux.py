"""End to end on the tiny Flux model: train, save, load the result with diffusers; the shipped preset."""

from __future__ import annotations

import pytest
import torch

from helpers.runs import base_config, train, write_dataset

T5_TOKENS = 32  # tokenizer_max_length for these runs: the tiny T5 needs no more, and it keeps steps fast
IMAGE_COUNT = 4  # sample images in this module's copy (the `images` fixture in tests/conftest.py)


@pytest.fixture(scope="module")
def tiny_flux(tiny_model):
    return tiny_model("flux")


def flux_config(tiny_flux, root, images, **overrides) -> dict:
    return base_config("flux", tiny_flux, root, images, tokenizer_max_length=T5_TOKENS, **overrides)


def render(pipeline) -> torch.Tensor:
    result = pipeline("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                      max_sequence_length=T5_TOKENS, generator=torch.Generator().manual_seed(0))
    return result.images


def test_lora_trains_saves_and_changes_the_output(tiny_flux, images, tmp_path):
    from diffusers import FluxPipeline

    config = flux_config(tiny_flux, tmp_path, images, flux_lora_target="all+ffs",
                         flux_guidance_mode="random-range", flux_attention_masked_training=True)
    state = train(config)
    assert state.global_step == 3
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists()
    pipeline = FluxPipeline.from_pretrained(tiny_flux)
    before = render(pipeline)
    pipeline.load_lora_weights(str(tmp_path / "output"))
    assert any("proj_mlp" in name for name, _ in pipeline.transformer.named_modules())  # the all+ffs preset
    after = render(pipeline)
    assert not torch.allclose(before, after), "the trained LoRA did not change the image"


def test_full_finetune_saves_a_loadable_pipeline(tiny_flux, images, tmp_path):
    from diffusers import FluxPipeline

    train(flux_config(tiny_flux, tmp_path, images, model_type="full", learning_rate=1e-3, gradient_checkpointing=True))
    trained = FluxPipeline.from_pretrained(str(tmp_path / "output"))
    original = FluxPipeline.from_pretrained(tiny_flux).transformer.state_dict()
    weights = trained.transformer.state_dict()
    assert any(not torch.equal(weights[key], original[key]) for key in original), "full fine-tune changed nothing"
    assert render(trained).shape == (1, 3, 64, 64)


def test_overfitting_four_images_lowers_the_loss(tiny_flux, images, tmp_path):
    config = flux_config(tiny_flux, tmp_path, images, model_type="full", max_train_steps=60, learning_rate=2e-3)
    losses = train(config).loss_history
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first * 0.8, f"loss did not fall: first 10 {first:.4f}, last 10 {last:.4f}"


def test_example_preset_passes_check(tiny_flux, images, tmp_path, capsys):
    from simpletuner.cli import main

    dataset_config = write_dataset(tmp_path, images)
    status = main(["check", "--example", "flux.peft-lora", f"--pretrained_model_name_or_path={tiny_flux}",
                   f"--data_backend_config={dataset_config}", f"--output_dir={tmp_path / 'output'}"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert "Configuration OK" in printed.out and "4 usable" in printed.out
