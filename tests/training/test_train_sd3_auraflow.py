"""End to end on tiny sd3 and auraflow: train, save and load the result with diffusers; the presets pass `check`."""

from __future__ import annotations

import pytest
import torch

from helpers.runs import base_config, train, write_dataset

FAMILIES = ["sd3", "auraflow"]
IMAGE_COUNT = 4  # sample images in this module's copy (the `images` fixture in tests/conftest.py)


def render(pipeline) -> torch.Tensor:
    return pipeline("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                    generator=torch.Generator().manual_seed(0), guidance_scale=1.0).images


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_saves_and_changes_the_output(family, tiny_model, images, tmp_path):
    from simpletuner.models.registry import get_family

    config = base_config(family, tiny_model(family), tmp_path, images, lora_alpha=8, caption_dropout_probability=0.5)
    state = train(config)
    assert state.global_step == 3
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists()
    pipeline = get_family(family).pipeline_class.from_pretrained(tiny_model(family))
    before = render(pipeline)
    pipeline.load_lora_weights(str(tmp_path / "output"))
    config = pipeline.transformer.peft_config["default_0"]
    assert (config.r, config.lora_alpha) == (4, 8), "the saved metadata must carry the trained alpha"
    assert not torch.allclose(before, render(pipeline)), "the trained LoRA did not change the image"


@pytest.mark.parametrize("family", FAMILIES)
def test_full_finetune_saves_a_loadable_pipeline(family, tiny_model, images, tmp_path):
    from simpletuner.models.registry import get_family

    config = base_config(family, tiny_model(family), tmp_path, images, model_type="full", learning_rate=1e-3,
                         gradient_checkpointing=True)
    train(config)
    pipeline_class = get_family(family).pipeline_class
    pipeline = pipeline_class.from_pretrained(str(tmp_path / "output"))
    trained = pipeline.transformer.state_dict()
    original = pipeline_class.from_pretrained(tiny_model(family)).transformer.state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in original), "full fine-tune changed nothing"
    assert render(pipeline).shape[-1] == 64


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_preset_passes_check(family, tiny_model, images, tmp_path, capsys):
    from simpletuner.cli import main

    dataset = write_dataset(tmp_path, images)
    code = main(["check", f"--example={family}.peft-lora", f"--pretrained_model_name_or_path={tiny_model(family)}",
                 f"--data_backend_config={dataset}", f"--output_dir={tmp_path / 'output'}"])
    output = capsys.readouterr()
    assert code == 0, output.out + output.err
    assert "Configuration OK" in output.out and "4 usable" in output.out
