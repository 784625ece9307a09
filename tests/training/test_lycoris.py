"""LyCORIS adapters: train LoKr / LoHa on tiny models, reload the file through lycoris, config errors."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.runs import base_config, train
from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings

LYCORIS_CASES = [("sdxl", "lokr"), ("sdxl", "loha"), ("flux", "lokr")]
IMAGE_COUNT = 4  # sample images in this module's copy (the `images` fixture in tests/conftest.py)


def write_lycoris_config(folder, algo: str = "lokr", **extra) -> str:
    config = {"algo": algo, "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 2, "factor": 2,
              "apply_preset": {"target_module": ["Attention", "FeedForward"],
                               "module_algo_map": {"Attention": {"factor": 2}, "FeedForward": {"factor": 4}}}}
    config.update(extra)
    path = folder / "lycoris_config.json"
    path.write_text(json.dumps(config))
    return str(path)


def load_denoiser(family: str, model_dir: str) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    if family == "flux":
        return FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer").eval()
    return UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval()


def denoiser_inputs(denoiser: torch.nn.Module) -> dict:
    """Fixed random inputs of the right shapes for a tiny SDXL UNet or Flux transformer."""
    generator = torch.Generator().manual_seed(3)
    config = denoiser.config

    def noise(*shape):
        return torch.randn(*shape, generator=generator)

    if "joint_attention_dim" in config:  # Flux: 4x4 packed image tokens, 5 text tokens
        return {"hidden_states": noise(1, 16, config.in_channels), "encoder_hidden_states":
                noise(1, 5, config.joint_attention_dim), "pooled_projections": noise(1, config.pooled_projection_dim),
                "timestep": torch.tensor([0.5]), "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(5, 3),
                "guidance": torch.tensor([3.5])}
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {"sample": noise(1, config.in_channels, 8, 8), "timestep": torch.tensor([500]),
            "encoder_hidden_states": noise(1, 77, config.cross_attention_dim),
            "added_cond_kwargs": {"text_embeds": noise(1, pooled),
                                  "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}


def run_denoiser(denoiser, inputs) -> torch.Tensor:
    with torch.no_grad():
        return denoiser(**inputs, return_dict=False)[0]


def lycoris_tensors(network) -> dict[str, torch.Tensor]:
    return {f"{layer.lora_name}.{name}": tensor
            for layer in network.loras for name, tensor in layer.state_dict().items()}


@pytest.mark.parametrize("family,algo", LYCORIS_CASES)
def test_lycoris_trains_and_reloads_through_lycoris(family, algo, tiny_model, images, tmp_path):
    from lycoris import create_lycoris_from_weights
    from safetensors.torch import load_file

    config = base_config(family, tiny_model(family), tmp_path, images, lora_type="lycoris", max_train_steps=2,
                         lycoris_config=write_lycoris_config(tmp_path, algo))
    assert train(config).global_step == 2
    weights_file = tmp_path / "output" / "pytorch_lora_weights.safetensors"
    saved = load_file(str(weights_file))
    assert saved and all(key.startswith("lycoris_") for key in saved)

    denoiser = load_denoiser(family, tiny_model(family))
    inputs = denoiser_inputs(denoiser)
    before = run_denoiser(denoiser, inputs)
    network, _ = create_lycoris_from_weights(1.0, str(weights_file), denoiser)
    reloaded = lycoris_tensors(network)
    assert set(reloaded) == set(saved)
    for key, tensor in saved.items():
        assert torch.equal(reloaded[key], tensor), key
    network.apply_to()
    after = run_denoiser(denoiser, inputs)
    assert not torch.allclose(before, after), "the trained LyCORIS network did not change the denoiser output"


def test_resuming_a_lycoris_checkpoint_repeats_the_same_step(tiny_model, images, tmp_path):
    config = base_config("sdxl", tiny_model("sdxl"), tmp_path, images, lora_type="lycoris", max_train_steps=2,
                         checkpoint_step_interval=1, lycoris_config=write_lycoris_config(tmp_path, "loha"))
    first = train(config).loss_history
    assert (tmp_path / "output" / "checkpoint-1" / "lycoris.safetensors").exists()
    resumed = train({**config, "resume_from_checkpoint": "checkpoint-1"})
    assert resumed.global_step == 2 and resumed.loss_history == first[1:]


# --- without the trainer: attach to a tiny UNet ----------------------------------------------

@pytest.fixture()
def make_adapter(tiny_model, tmp_path):
    from simpletuner.models.base import Components
    from simpletuner.models.registry import get_family
    from simpletuner.training.lycoris_adapter import LycorisNetwork

    default_folder = tmp_path / "default-lycoris"
    default_folder.mkdir()

    def make(**options):
        values = {"model_family": "sdxl", "pretrained_model_name_or_path": tiny_model("sdxl"), "model_type": "lora",
                  "lora_type": "lycoris", "seed": 1, "lycoris_config": write_lycoris_config(default_folder)}
        values.update(options)
        settings = Settings(values)
        family = get_family("sdxl")(settings)
        torch.manual_seed(0)
        family.components = Components(denoiser=load_denoiser("sdxl", tiny_model("sdxl")), vae=None)
        return LycorisNetwork(family, settings)

    return make


def test_checkpoint_state_round_trips_into_a_new_network(make_adapter):
    first = make_adapter()
    first.attach()
    with torch.no_grad():
        for parameter in first.parameters:
            parameter.add_(torch.randn_like(parameter))
    state = first.state_dict(first.module)
    assert first.parameters and all(p.requires_grad for p in first.parameters)
    assert not any(p.requires_grad for name, p in first.module.named_parameters() if "lycoris" not in name)
    second = make_adapter()
    second.attach()
    second.load_state_dict(second.module, state)
    for key, tensor in second.state_dict(second.module).items():
        assert torch.equal(tensor, state[key]), key


def test_init_lora_starts_from_a_saved_lycoris_file(make_adapter, tmp_path):
    first = make_adapter()
    first.attach()
    with torch.no_grad():
        for parameter in first.parameters:
            parameter.add_(torch.randn_like(parameter))
    first.save(first.module, str(tmp_path / "saved"))
    second = make_adapter(init_lora=str(tmp_path / "saved" / "pytorch_lora_weights.safetensors"))
    second.attach()
    expected = first.state_dict(first.module)
    for key, tensor in second.state_dict(second.module).items():
        assert torch.equal(tensor, expected[key]), key


def test_init_lokr_norm_perturbs_the_zero_factor(make_adapter):
    plain = make_adapter()
    plain.attach()
    inputs = denoiser_inputs(plain.module)
    base = load_denoiser("sdxl", plain.settings.pretrained_model_name_or_path)
    assert torch.allclose(run_denoiser(plain.module, inputs), run_denoiser(base, inputs)), "LoKr must start as a no-op"
    perturbed = make_adapter(init_lokr_norm=1e-2)
    perturbed.attach()
    factors = [t for k, t in perturbed.state_dict(perturbed.module).items() if k.endswith(("lokr_w2", "lokr_w2_b"))]
    assert factors and all(factor.any() for factor in factors)
    spread = torch.cat([factor.flatten() for factor in factors]).std().item()
    assert 0.5e-2 < spread < 2e-2
    assert not torch.allclose(run_denoiser(perturbed.module, inputs), run_denoiser(base, inputs))


def test_init_lokr_norm_with_another_algorithm_is_an_error(make_adapter, tmp_path):
    adapter = make_adapter(lycoris_config=write_lycoris_config(tmp_path, "loha"), init_lokr_norm=1e-3)
    with pytest.raises(ConfigError) as error:
        adapter.attach()
    assert error.value.key == "init_lokr_norm" and "loha" in str(error.value)


def test_strength_scales_the_adapter_and_restores_it(make_adapter):
    adapter = make_adapter(init_lokr_norm=1e-1)
    adapter.attach()
    inputs = denoiser_inputs(adapter.module)
    full = run_denoiser(adapter.module, inputs)
    with adapter.strength(0.0):
        assert all(layer.multiplier == 0.0 for layer in adapter.network.loras)
        off = run_denoiser(adapter.module, inputs)
    base = load_denoiser("sdxl", adapter.settings.pretrained_model_name_or_path)
    assert torch.allclose(off, run_denoiser(base, inputs), atol=1e-6)
    assert torch.equal(run_denoiser(adapter.module, inputs), full)


def test_relative_lycoris_config_is_read_from_the_working_directory(make_adapter, tmp_path, monkeypatch):
    (tmp_path / "config").mkdir()
    write_lycoris_config(tmp_path / "config", "loha")
    monkeypatch.chdir(tmp_path)
    adapter = make_adapter(lycoris_config="config/lycoris_config.json")
    adapter.attach()
    assert {type(layer).__name__ for layer in adapter.network.loras} == {"LohaModule"}


@pytest.mark.parametrize("content,expected", [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"algo": "lokr", "facotr": 4}', "facotr"),
    ('{"algo": "nope"}', "not a LyCORIS algorithm"),
    ('{"algo": "lokr", "factor": "big"}', "must be a number"),
    ('{"algo": "lokr", "apply_preset": {"target_modules": ["Attention"]}}', "target_modules"),
    ('{"algo": "lokr", "apply_preset": {"target_module": ["NoSuchBlock"]}}', "matched no layer"),
])
def test_bad_lycoris_config_names_the_option_and_file(make_adapter, tmp_path, content, expected):
    path = tmp_path / "broken" / "lycoris.json"
    if content is not None:
        path.parent.mkdir()
        path.write_text(content)
    adapter = make_adapter(lycoris_config=str(path))
    with pytest.raises(ConfigError) as error:
        adapter.attach()
    assert error.value.key == "lycoris_config"
    assert expected in str(error.value) and "lycoris_config" in str(error.value)
    assert str(path) in str(error.value) or str(path.name) in str(error.value)


def test_comfyui_format_is_refused_for_lycoris(make_adapter):
    adapter = make_adapter(lora_format="comfyui")
    with pytest.raises(ConfigError) as error:
        adapter.attach()
    assert error.value.key == "lora_format"


def test_make_trainable_picks_lycoris():
    from simpletuner.training.lycoris_adapter import LycorisNetwork
    from simpletuner.training.trainable import PeftLora, make_trainable

    class Family:
        components = type("Parts", (), {"denoiser": torch.nn.Linear(2, 2)})()

    assert isinstance(make_trainable(Family(), Settings({"lora_type": "lycoris"})), LycorisNetwork)
    assert isinstance(make_trainable(Family(), Settings({"lora_type": "standard"})), PeftLora)
