"""init_lora: a new PEFT LoRA starts from a saved LoRA file (diffusers or ComfyUI layout)."""

from __future__ import annotations

import pytest
import torch

from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.training import adapters


@pytest.fixture(scope="module")
def tiny_sdxl(tiny_model):
    return tiny_model("sdxl")


@pytest.fixture()
def make_lora(tiny_sdxl):
    from diffusers import UNet2DConditionModel

    from simpletuner.models.base import Components
    from simpletuner.models.registry import get_family
    from simpletuner.training.trainable import PeftLora

    def make(**options):
        values = {"model_family": "sdxl", "pretrained_model_name_or_path": tiny_sdxl, "lora_rank": 4}
        values.update(options)
        settings = Settings(values)
        family = get_family("sdxl")(settings)
        family.components = Components(denoiser=UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet"),
                                       vae=None)
        return PeftLora(family, settings)

    return make


def trained_lora(make_lora, folder, **options):
    """An attached LoRA with random (non-zero) A and B, saved to folder; returns (lora, its state)."""
    lora = make_lora(**options)
    lora.attach()
    torch.manual_seed(5)
    with torch.no_grad():
        for parameter in lora.parameters:
            parameter.copy_(torch.randn_like(parameter))
    lora.save(lora.module, str(folder))
    return lora, {key: value.clone() for key, value in lora.state_dict(lora.module).items()}


def sdxl_inputs(config) -> dict:
    generator = torch.Generator().manual_seed(1)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {"sample": torch.randn(1, 4, 8, 8, generator=generator), "timestep": torch.tensor([300]),
            "encoder_hidden_states": torch.randn(1, 77, config.cross_attention_dim, generator=generator),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, generator=generator),
                                  "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}


@pytest.mark.parametrize("lora_format", ["diffusers", "comfyui"])
def test_new_lora_starts_with_the_saved_weights(make_lora, tmp_path, lora_format):
    _, saved = trained_lora(make_lora, tmp_path, lora_format=lora_format)
    started = make_lora(init_lora=str(tmp_path / "pytorch_lora_weights.safetensors"))
    started.attach()
    state = started.state_dict(started.module)
    assert set(state) == set(saved)
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
    assert all(parameter.requires_grad for parameter in started.parameters)


def test_another_alpha_is_rescaled_so_the_update_is_the_same(make_lora, tmp_path):
    source, saved = trained_lora(make_lora, tmp_path, lora_alpha=8)  # scale 8 / 4 = 2
    started = make_lora(init_lora=str(tmp_path / "pytorch_lora_weights.safetensors"), lora_alpha=4)  # scale 1
    started.attach()
    state = started.state_dict(started.module)
    for key, tensor in saved.items():
        expected = tensor * 2 if key.endswith("lora_B.weight") else tensor
        assert torch.allclose(state[key], expected), key
    with torch.no_grad():  # eval: lora_dropout off
        inputs = sdxl_inputs(source.module.config)
        expected = source.module.eval()(**inputs).sample
        assert torch.allclose(started.module.eval()(**inputs).sample, expected, atol=1e-5)


def test_dora_file_into_a_dora_adapter(make_lora, tmp_path):
    _, saved = trained_lora(make_lora, tmp_path, use_dora=True)
    started = make_lora(init_lora=str(tmp_path / "pytorch_lora_weights.safetensors"), use_dora=True)
    started.attach()
    state = started.state_dict(started.module)
    assert any(key.endswith("lora_magnitude_vector") for key in saved)
    assert all(torch.equal(state[key], tensor) for key, tensor in saved.items())
    plain = make_lora(init_lora=str(tmp_path / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ConfigError, match="use_dora"):
        plain.attach()


def test_other_rank_is_an_error_naming_lora_rank(make_lora, tmp_path):
    trained_lora(make_lora, tmp_path)
    started = make_lora(init_lora=str(tmp_path / "pytorch_lora_weights.safetensors"), lora_rank=2)
    with pytest.raises(ConfigError) as error:
        started.attach()
    assert error.value.key == "init_lora" and "lora_rank" in str(error.value)


def test_file_with_layers_the_adapter_lacks_is_an_error(make_lora, tmp_path):
    trained_lora(make_lora, tmp_path, peft_lora_target_modules='["to_q", "to_k", "to_v", "to_out.0", "proj_in"]')
    started = make_lora(init_lora=str(tmp_path / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ConfigError, match="peft_lora_target_modules"):
        started.attach()


def test_missing_file_and_lycoris_file_are_errors(make_lora, tmp_path):
    from safetensors.torch import save_file

    missing = make_lora(init_lora=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ConfigError, match="no such file"):
        missing.attach()
    lycoris_file = tmp_path / "lycoris.safetensors"
    save_file({"lycoris_down_blocks_0_attn.lokr_w1": torch.ones(2, 2)}, str(lycoris_file))
    with pytest.raises(ConfigError, match="lora_type=lycoris"):
        make_lora(init_lora=str(lycoris_file)).attach()


def test_file_without_alpha_metadata_is_taken_as_alpha_equal_rank(make_lora, tmp_path):
    from safetensors.torch import save_file

    _, saved = trained_lora(make_lora, tmp_path, lora_alpha=4)
    bare = tmp_path / "bare.safetensors"
    save_file({f"unet.{key}": value for key, value in saved.items()}, str(bare))  # no metadata: alpha = rank
    started = make_lora(init_lora=str(bare), lora_alpha=2)  # scale 0.5 -> B doubles to keep the update
    started.attach()
    state = adapters.lora_state_dict(started.module)
    for key, tensor in saved.items():
        assert torch.allclose(state[key], tensor * 2 if key.endswith("lora_B.weight") else tensor), key
