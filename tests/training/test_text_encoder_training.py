"""train_text_encoder end to end on the tiny SD families: LoRA and full, saving, loading, exact resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import base_config, train


IMAGE_COUNT = 4  # sample images in this module's copy (the `images` fixture in tests/conftest.py)


def te_config(family, tiny_model, images, root, **overrides):
    values = {"train_text_encoder": True, "text_encoder_limit": 100, "max_train_steps": 2,
              "resume_from_checkpoint": "none", **overrides}
    return base_config(family, tiny_model(family), root, images, **values)


def encoder_outputs(pipeline) -> list[torch.Tensor]:
    encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if hasattr(pipeline, "text_encoder_2") else [])
    ids = pipeline.tokenizer(["a red circle"], padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
    with torch.no_grad():
        return [encoder(ids)[0] for encoder in encoders]


@pytest.mark.parametrize("family, attributes", [("sd1x", ["text_encoder"]),
                                                ("sdxl", ["text_encoder", "text_encoder_2"])])
def test_lora_trains_the_text_encoders_and_saves_them_loadable(family, attributes, tiny_model, images, tmp_path):
    from simpletuner.models.registry import get_family

    state = train(te_config(family, tiny_model, images, tmp_path, text_encoder_lr=5e-3))
    assert state.global_step == 2
    saved = load_file(str(tmp_path / "output" / "pytorch_lora_weights.safetensors"))
    for attribute in attributes:
        trained_b = [value for key, value in saved.items()  # B ("up" in diffusers' naming) starts at zero
                     if key.startswith(f"{attribute}.") and ("lora_B" in key or "lora_linear_layer.up" in key)]
        assert trained_b, f"no {attribute} LoRA in the saved file"
        assert any(value.abs().sum() > 0 for value in trained_b), f"{attribute} LoRA did not train (B still zero)"
    pipeline = get_family(family).pipeline_class.from_pretrained(tiny_model(family))
    before = encoder_outputs(pipeline)
    pipeline.load_lora_weights(str(tmp_path / "output"))
    after = encoder_outputs(pipeline)
    for attribute, old, new in zip(attributes, before, after):
        assert not torch.allclose(old, new), f"loading the LoRA left {attribute}'s output unchanged"


def test_full_finetune_saves_the_trained_text_encoder(tiny_model, images, tmp_path):
    from diffusers import StableDiffusionPipeline

    train(te_config("sd1x", tiny_model, images, tmp_path, model_type="full", learning_rate=1e-3))
    trained = StableDiffusionPipeline.from_pretrained(str(tmp_path / "output"))
    base = StableDiffusionPipeline.from_pretrained(tiny_model("sd1x"))
    assert not torch.allclose(encoder_outputs(trained)[0], encoder_outputs(base)[0])


def test_resume_with_text_encoder_training_is_exact(tiny_model, images, tmp_path):
    # text_encoder_limit=40 freezes the encoder after step 2 of 4, just after the checkpoint is written, so the
    # resumed run must start with it frozen.
    config = te_config("sd1x", tiny_model, images, tmp_path, max_train_steps=4, checkpoint_step_interval=2,
                       text_encoder_limit=40, text_encoder_lr=2e-3)
    train(config)
    output = tmp_path / "output"
    straight = load_file(str(output / "pytorch_lora_weights.safetensors"))
    checkpoint_weights = load_file(str(output / "checkpoint-2" / "adapter.safetensors"))
    assert any(key.startswith("text_encoder.") for key in checkpoint_weights)
    (output / "pytorch_lora_weights.safetensors").unlink()
    state = train({**config, "resume_from_checkpoint": "latest"})
    assert state.global_step == 4
    resumed = load_file(str(output / "pytorch_lora_weights.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.allclose(straight[key], resumed[key], atol=1e-6), key


def test_resuming_a_checkpoint_without_text_encoder_weights_says_so(tiny_model, images, tmp_path):
    config = base_config("sd1x", tiny_model("sd1x"), tmp_path, images, max_train_steps=3, checkpoint_step_interval=2,
                         resume_from_checkpoint="none")
    train(config)
    with pytest.raises(ValueError, match="without train_text_encoder"):
        train({**config, "train_text_encoder": True, "resume_from_checkpoint": "latest"})
