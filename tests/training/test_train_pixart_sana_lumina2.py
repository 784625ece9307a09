"""End to end on tiny PixArt Sigma, Sana and Lumina 2: train 3 steps, save, load the result with diffusers."""

from __future__ import annotations

import pytest
import torch

from helpers.runs import base_config, train
from simpletuner.config.loader import EXAMPLES_DIR
from simpletuner.config.settings import Settings
from simpletuner.models.registry import get_family

FAMILIES = ["pixart_sigma", "sana", "lumina2"]
PEFT_LORA_FAMILIES = ["sana", "lumina2"]  # PixArtSigmaPipeline has no LoRA loader
LYCORIS_PRESETS = {"pixart_sigma": "pixart.lycoris-lokr", "sana": "sana.lycoris-lokr"}


def render(family: str, pipeline) -> torch.Tensor:
    arguments = get_family(family)(Settings({"model_family": family})).pipeline_call_arguments()
    result = pipeline("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                      generator=torch.Generator().manual_seed(0), guidance_scale=1.0, **arguments)
    return result.images


@pytest.mark.parametrize("family", PEFT_LORA_FAMILIES)
def test_lora_trains_saves_and_changes_the_output(family, tiny_model, images, tmp_path):
    state = train(base_config(family, tiny_model(family), tmp_path, images))
    assert state.global_step == 3
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists()
    pipeline = get_family(family).pipeline_class.from_pretrained(tiny_model(family))
    before = render(family, pipeline)
    pipeline.load_lora_weights(str(tmp_path / "output"))
    after = render(family, pipeline)
    assert not torch.allclose(before, after), "the trained LoRA did not change the image"


@pytest.mark.parametrize("family", sorted(LYCORIS_PRESETS))
def test_lycoris_preset_network_trains_and_changes_the_output(family, tiny_model, images, tmp_path):
    from lycoris import create_lycoris_from_weights

    lycoris_config = str(EXAMPLES_DIR / LYCORIS_PRESETS[family] / "lycoris_config.json")
    config = base_config(family, tiny_model(family), tmp_path, images, lora_type="lycoris",
                         lycoris_config=lycoris_config)
    assert train(config).global_step == 3
    pipeline = get_family(family).pipeline_class.from_pretrained(tiny_model(family))
    before = render(family, pipeline)
    network, _ = create_lycoris_from_weights(
        1.0, str(tmp_path / "output" / "pytorch_lora_weights.safetensors"), pipeline.transformer)
    network.apply_to()
    assert not torch.allclose(before, render(family, pipeline)), "the trained LyCORIS network changed nothing"


@pytest.mark.parametrize("family", FAMILIES)
def test_full_finetune_saves_a_loadable_pipeline(family, tiny_model, images, tmp_path):
    config = base_config(family, tiny_model(family), tmp_path, images, model_type="full", learning_rate=1e-3)
    assert train(config).global_step == 3
    pipeline_class = get_family(family).pipeline_class
    pipeline = pipeline_class.from_pretrained(str(tmp_path / "output"))
    trained = pipeline.transformer.state_dict()
    original = pipeline_class.from_pretrained(tiny_model(family)).transformer.state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in original), "full fine-tune changed nothing"
    assert render(family, pipeline).shape == (1, 3, 64, 64)
