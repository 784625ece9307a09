"""ComfyUI LoRA layout: exact round trips with the diffusers layout, detection, and lora_format=comfyui output."""

from __future__ import annotations

import pytest
import torch

from helpers.images import copy_sample_images
from helpers.runs import base_config, train
from simpletuner.config.settings import Settings
from simpletuner.training import comfyui_format


@pytest.fixture(scope="module")
def tiny_sdxl(tiny_model):
    return tiny_model("sdxl")


@pytest.fixture(scope="module")
def dora_lora_file(tiny_sdxl, tmp_path_factory):
    """A diffusers-layout SDXL LoRA file with DoRA magnitudes and random (non-zero) matrices."""
    from diffusers import UNet2DConditionModel

    from simpletuner.models.registry import get_family
    from simpletuner.training import adapters

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    settings = Settings({"lora_rank": 4, "lora_alpha": 8, "use_dora": True})
    adapters.attach_lora(unet, settings, ["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in adapters.trainable_parameters(unet):
            parameter.add_(torch.randn_like(parameter))
    folder = tmp_path_factory.mktemp("dora")
    family = get_family("sdxl")(Settings({"pretrained_model_name_or_path": tiny_sdxl}))
    family.save_lora(str(folder), adapters.lora_state_dict(unet),
                     adapter_metadata={"unet": unet.peft_config["default"].to_dict()})
    return folder / "pytorch_lora_weights.safetensors"


def test_diffusers_to_comfyui_to_diffusers_keeps_every_tensor(dora_lora_file):
    original, _ = comfyui_format.read_lora_file(str(dora_lora_file))
    # conv1 has no diffusers-layout name, so the whole file keeps PEFT's lora_A/lora_B names (one layout)
    assert any(".lora_A.weight" in key for key in original) and not any(".lora.down." in key for key in original)
    comfy = comfyui_format.diffusers_to_comfyui(original, alpha=8)
    assert all(key.startswith("diffusion_model.") for key in comfy)
    alphas = {key: value for key, value in comfy.items() if key.endswith(".alpha")}
    assert alphas and all(value.item() == 8 for value in alphas.values())
    dora = [value for key, value in comfy.items() if key.endswith(".dora_scale")]
    assert dora and all(value.dim() >= 2 and value.shape[1] == 1 for value in dora)

    back, back_alphas = comfyui_format.comfyui_to_diffusers(comfy, "unet")
    assert len(back) == len(original)
    assert set(back_alphas.values()) == {8.0} and len(back_alphas) == len(alphas)
    for key, tensor in original.items():
        layer, part = comfyui_format.split_key(key[len("unet."):])
        assert torch.equal(back[f"unet.{layer}.{part}"], tensor), key


def test_peft_layout_round_trips_to_identical_keys():
    state = {
        "transformer.blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 8),
        "transformer.blocks.0.attn.to_q.lora_B.weight": torch.randn(8, 4),
        "transformer.blocks.0.attn.to_q.lora_magnitude_vector": torch.rand(8),
        "transformer.proj.lora_A.weight": torch.randn(2, 3, 1, 1),
        "transformer.proj.lora_B.weight": torch.randn(5, 2, 1, 1),
        "transformer.proj.lora_magnitude_vector": torch.rand(1, 5, 1, 1),  # PEFT's conv DoRA layout
    }
    comfy = comfyui_format.diffusers_to_comfyui(state, alpha={"": 4.0, "proj": 2.0})
    assert comfy["diffusion_model.proj.alpha"].item() == 2.0
    assert comfy["diffusion_model.blocks.0.attn.to_q.alpha"].item() == 4.0
    assert comfy["diffusion_model.blocks.0.attn.to_q.dora_scale"].shape == (8, 1)
    assert comfy["diffusion_model.proj.dora_scale"].shape == (5, 1, 1, 1)
    back, alphas = comfyui_format.comfyui_to_diffusers(comfy, "transformer")
    assert alphas == {"blocks.0.attn.to_q": 4.0, "proj": 2.0}
    assert set(back) == set(state)
    assert all(torch.equal(back[key], state[key]) for key in state)


def test_comfyui_input_with_lora_up_down_names_is_read():
    comfy = {"diffusion_model.a.b.lora_down.weight": torch.ones(2, 3),
             "diffusion_model.a.b.lora_up.weight": torch.ones(3, 2), "diffusion_model.a.b.alpha": torch.tensor(1.0)}
    assert comfyui_format.is_comfyui_lora(comfy)
    peft_state, alphas = comfyui_format.comfyui_to_peft(comfy)
    assert set(peft_state) == {"a.b.lora_A.weight", "a.b.lora_B.weight"} and alphas == {"a.b": 1.0}
    assert not comfyui_format.is_comfyui_lora({"unet.a.b.lora_A.weight": torch.ones(1)})


def test_foreign_keys_are_refused():
    with pytest.raises(ValueError, match="not a LoRA tensor name"):
        comfyui_format.diffusers_to_comfyui({"unet.a.weight": torch.ones(1)}, alpha=1)
    with pytest.raises(ValueError, match="denoiser only"):
        comfyui_format.diffusers_to_comfyui({"text_encoder.a.lora_A.weight": torch.ones(1, 1)}, alpha=1)
    with pytest.raises(ValueError, match="per-output"):
        comfyui_format.comfyui_to_peft({"diffusion_model.a.dora_scale": torch.ones(1, 4)})


def test_training_with_lora_format_comfyui_writes_comfyui_keys(tiny_sdxl, sample_images, tmp_path):
    from simpletuner.models.registry import get_family

    copy_sample_images(sample_images, tmp_path / "images", count=2)
    config = base_config("sdxl", tiny_sdxl, tmp_path, tmp_path / "images", lora_format="comfyui", max_train_steps=2)
    train(config)
    saved, metadata = comfyui_format.read_lora_file(str(tmp_path / "output" / "pytorch_lora_weights.safetensors"))
    assert saved and all(key.startswith("diffusion_model.") for key in saved)
    assert {value.item() for key, value in saved.items() if key.endswith(".alpha")} == {4.0}  # lora_alpha = rank
    assert '"r": 4' in metadata["lora_config"]

    state, _ = comfyui_format.comfyui_to_diffusers(saved, "unet")
    pipeline = get_family("sdxl").pipeline_class.from_pretrained(tiny_sdxl)
    render = dict(prompt="a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                  guidance_scale=1.0)
    before = pipeline(**render, generator=torch.Generator().manual_seed(0)).images
    pipeline.load_lora_weights(state)
    after = pipeline(**render, generator=torch.Generator().manual_seed(0)).images
    assert not torch.allclose(before, after), "the converted-back LoRA did not change the image"
