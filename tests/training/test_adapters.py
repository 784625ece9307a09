import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.training.adapters import (
    attach_lora,
    load_lora_state,
    lora_config,
    lora_state_dict,
    resolve_target_modules,
    trainable_parameters,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )


def _settings(**values) -> Settings:
    return Settings({"lora_rank": 4, **values})


def _forward(unet: UNet2DConditionModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 5, 32, generator=generator)
    return unet(sample, torch.tensor([10]), encoder_hidden_states=context).sample


def test_attaching_leaves_only_lora_weights_trainable():
    unet = _unet()
    unet.requires_grad_(False)
    before = _forward(unet)
    attach_lora(unet, _settings(lora_dropout=0.0), TARGETS)
    trainable = trainable_parameters(unet)
    names = {name for name, parameter in unet.named_parameters() if parameter.requires_grad}
    assert trainable and len(trainable) == len(names)
    assert all("lora_A" in name or "lora_B" in name for name in names)
    assert any(".to_out.0.lora_B" in name for name in names)
    torch.testing.assert_close(_forward(unet), before)  # default init starts as a no-op


def test_state_dict_round_trip():
    unet = _unet()
    attach_lora(unet, _settings(), TARGETS)
    with torch.no_grad():
        for parameter in trainable_parameters(unet):
            parameter.normal_()
    saved = {key: value.clone() for key, value in lora_state_dict(unet).items()}
    assert saved and all("lora_" in key and ".default." not in key for key in saved)
    other = _unet()
    attach_lora(other, _settings(), TARGETS)
    load_lora_state(other, saved)
    for key, value in lora_state_dict(other).items():
        torch.testing.assert_close(value, saved[key])
    unet.eval()
    other.eval()
    torch.testing.assert_close(_forward(other), _forward(unet))


def test_loading_a_mismatched_adapter_is_refused():
    unet = _unet()
    attach_lora(unet, _settings(), ["to_q"])
    other = _unet()
    attach_lora(other, _settings(), ["to_q", "to_k"])
    with pytest.raises(ValueError, match="adapter tensors missing"):
        load_lora_state(other, lora_state_dict(unet))


def test_dora_attaches_and_saves_magnitudes():
    unet = _unet()
    attach_lora(unet, _settings(use_dora=True), TARGETS)
    keys = lora_state_dict(unet)
    assert any("lora_magnitude_vector" in key for key in keys)
    assert all(p.requires_grad for n, p in unet.named_parameters() if "lora_magnitude_vector" in n)
    _forward(unet).sum().backward()


def test_bad_target_gives_a_clear_error():
    unet = _unet()
    with pytest.raises(ConfigError) as raised:
        attach_lora(unet, _settings(peft_lora_target_modules='["not_a_layer"]'), TARGETS)
    message = str(raised.value)
    assert "not_a_layer" in message and "to_q" in message and "peft_lora_target_modules" in message
    assert not any("lora_" in name for name, _ in unet.named_parameters())


def test_config_from_options(tmp_path):
    config = lora_config(_settings(lora_rank=8, lora_dropout=0.05, lora_init_type="gaussian"), TARGETS)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.init_lora_weights) == (8, 8, 0.05, "gaussian")
    assert set(config.target_modules) == set(TARGETS)
    assert lora_config(_settings(lora_alpha=2), TARGETS).lora_alpha == 2
    assert lora_config(_settings(), TARGETS).init_lora_weights is True
    targets_file = tmp_path / "targets.json"
    targets_file.write_text(json.dumps(["to_k"]))
    assert resolve_target_modules(_settings(peft_lora_target_modules=str(targets_file)), TARGETS) == ["to_k"]
    assert resolve_target_modules(_settings(peft_lora_target_modules="to_q, to_v"), TARGETS) == ["to_q", "to_v"]
    assert resolve_target_modules(_settings(peft_lora_target_modules=["proj_in"]), TARGETS) == ["proj_in"]
    with pytest.raises(ConfigError, match="peft_lora_target_modules"):
        resolve_target_modules(_settings(peft_lora_target_modules='{"to_q": 1}'), TARGETS)


@pytest.mark.parametrize("init_type", ["olora", "pissa"])
def test_weight_derived_inits_keep_the_model_output(init_type):
    unet = _unet()
    before = _forward(unet)
    attach_lora(unet, _settings(lora_init_type=init_type, lora_dropout=0.0), ["to_q"])
    assert lora_state_dict(unet)
    torch.testing.assert_close(_forward(unet), before, atol=1e-4, rtol=1e-4)


def test_loftq_without_scipy_is_refused_clearly():
    import importlib.util

    if importlib.util.find_spec("scipy") is not None:
        pytest.skip("scipy is installed, so loftq is available")
    with pytest.raises(ConfigError, match="pip install scipy"):
        lora_config(_settings(lora_init_type="loftq"), TARGETS)


def test_text_encoder_gets_an_injected_adapter():
    from transformers import CLIPTextConfig, CLIPTextModel

    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                                           eos_token_id=1, pad_token_id=2))
    attach_lora(encoder, _settings(), ["q_proj", "v_proj"])
    names = [name for name, parameter in encoder.named_parameters() if parameter.requires_grad]
    assert len(names) == 8 and all("lora_" in name for name in names)
    assert len(lora_state_dict(encoder)) == 8
