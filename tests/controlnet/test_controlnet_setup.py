"""Building the ControlNet: LoRA layout, custom configs, loading a saved one, and the settings refused up front."""

from __future__ import annotations

import pytest
import torch

from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from simpletuner.models.tiny import build_tiny

    return build_tiny("sdxl", str(tmp_path_factory.mktemp("models") / "sdxl"))


def loaded_family(model: str, **values):
    from simpletuner.models.registry import get_family
    from simpletuner.training.model_setup import prepare_components

    settings = Settings({"model_family": "sdxl", "pretrained_model_name_or_path": model, "controlnet": True,
                         "lora_rank": 2, "mixed_precision": "no", **values})
    family = get_family("sdxl")(settings)
    components = family.load(torch.device("cpu"), torch.float32)
    prepare_components(family, components, settings, torch.device("cpu"))
    return family, settings


def attached(model: str, **values):
    from simpletuner.training.trainable import make_trainable

    family, settings = loaded_family(model, **values)
    trainable = make_trainable(family, settings)
    trainable.attach()
    return family, trainable


def test_lora_adapts_the_copied_layers_and_trains_the_control_layers_in_full(tiny_sdxl):
    from simpletuner.training.controlnet_model import ControlledDenoiser

    family, trainable = attached(tiny_sdxl)
    assert isinstance(family.components.denoiser, ControlledDenoiser)
    assert not any(p.requires_grad for p in trainable.module.denoiser.parameters())
    names = set(trainable.state_dict(trainable.module))
    assert any("lora_A" in name and name.startswith("down_blocks") for name in names)
    own = [name for name in names if name.startswith(("controlnet_cond_embedding", "controlnet_down_blocks"))]
    assert own and not any("lora_" in name for name in own)
    assert all(p.dtype == torch.float32 for p in trainable.parameters)


def test_full_controlnet_trains_every_weight(tiny_sdxl):
    _, trainable = attached(tiny_sdxl, model_type="full")
    controlnet = trainable.module.controlnet
    assert len(trainable.parameters) == len(list(controlnet.parameters()))


def test_custom_config_reshapes_and_unknown_keys_are_named(tiny_sdxl):
    from simpletuner.training.controlnet_model import build_controlnet

    family, settings = loaded_family(tiny_sdxl)
    denoiser = family.components.denoiser
    shaped = build_controlnet(family, denoiser, settings.replace(
        controlnet_custom_config='{"conditioning_channels": 1, "conditioning_embedding_out_channels": [8, 16]}'))
    assert shaped.controlnet_cond_embedding.conv_in.in_channels == 1
    assert torch.equal(shaped.conv_in.weight, denoiser.conv_in.weight)  # still copied from the UNet
    with pytest.raises(ConfigError, match="num_fancy_layers"):
        build_controlnet(family, denoiser, settings.replace(controlnet_custom_config='{"num_fancy_layers": 3}'))


def test_a_saved_controlnet_loads_from_a_run_output_folder(tiny_sdxl, tmp_path):
    from simpletuner.training.controlnet_model import build_controlnet

    family, settings = loaded_family(tiny_sdxl, model_type="full")
    first = build_controlnet(family, family.components.denoiser, settings)
    with torch.no_grad():
        first.controlnet_mid_block.weight.fill_(0.5)
    first.save_pretrained(str(tmp_path / "controlnet"))
    loaded = build_controlnet(family, family.components.denoiser,
                              settings.replace(controlnet_model_name_or_path=str(tmp_path)))
    assert torch.equal(loaded.controlnet_mid_block.weight, first.controlnet_mid_block.weight)


def test_merged_lora_controlnet_equals_the_adapted_one(tiny_sdxl):
    from simpletuner.training.controlnet import _merged

    _, trainable = attached(tiny_sdxl)
    controlnet = trainable.module.controlnet
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if "lora_B" in name or name.startswith("controlnet_"):
                parameter.normal_(0, 0.02)
    controlnet.eval()
    merged = _merged(controlnet).eval()
    inputs = dict(sample=torch.randn(1, 4, 8, 8), timestep=torch.tensor([10]),
                  encoder_hidden_states=torch.randn(1, 77, 80), controlnet_cond=torch.rand(1, 3, 64, 64),
                  added_cond_kwargs={"text_embeds": torch.randn(1, 48), "time_ids": torch.randn(1, 6)},
                  return_dict=False)
    with torch.no_grad():
        adapted_down, adapted_mid = controlnet(**inputs)
        merged_down, merged_mid = merged(**inputs)
    assert torch.allclose(adapted_mid, merged_mid, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(adapted_down, merged_down))


@pytest.mark.parametrize("values, option", [
    ({"controlnet": True, "model_family": "auraflow"}, "controlnet"),
    ({"controlnet": True, "model_family": "pixart_sigma"}, None),
    ({"controlnet": True, "model_family": "sana"}, None),
    ({"controlnet": True, "model_family": "sdxl", "lora_type": "lycoris"}, "lora_type"),
    ({"controlnet": True, "model_family": "sdxl", "validation_prompt": "a cat"}, None),
    ({"controlnet": True, "model_family": "sdxl", "validation_using_datasets": True}, "validation_using_datasets"),
    ({"controlnet": True, "model_family": "sdxl", "validation_prompt": "a cat", "validation_torch_compile": True},
     "validation_torch_compile"),
    ({"controlnet": True, "model_family": "sdxl", "controlnet_custom_config": "{not json"},
     "controlnet_custom_config"),
    ({"model_family": "sdxl", "controlnet_model_name_or_path": "some/controlnet"}, "controlnet_model_name_or_path"),
    ({"model_family": "flux", "flux_lora_target": "controlnet"}, "flux_lora_target"),
    ({"model_family": "sdxl", "masked_loss_probability": 1.5}, "masked_loss_probability"),
])
def test_settings_a_run_cannot_honour_are_refused_before_loading(values, option):
    from simpletuner.models.controlnets import controlnet_problems

    problems = controlnet_problems(Settings(values))
    assert [problem.key for problem in problems] == ([option] if option else [])
