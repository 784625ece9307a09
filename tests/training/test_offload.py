"""Offloading: group offload and block swap train exactly like the plain run; text encoders visit the device."""

from __future__ import annotations

import pytest
import torch

from helpers.runs import base_config, run_trainer
from simpletuner.config import hardware
from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.config.validate import validate_settings
from simpletuner.training import offload, weight_streaming

CPU = torch.device("cpu")
IMAGE_COUNT = 4  # sample images in this module's copy (the `images` fixture in tests/conftest.py)


@pytest.fixture(scope="module")
def baseline_losses(tiny_model, images, tmp_path_factory):
    """Three-step loss histories of the plain runs, one per family."""
    runs = {}

    def losses(family: str, **overrides) -> list[float]:
        key = (family, tuple(sorted(overrides.items())))
        if key not in runs:
            root = tmp_path_factory.mktemp(f"baseline-{family}")
            config = base_config(family, tiny_model(family), root, images, **overrides)
            runs[key] = run_trainer(config).state.loss_history
        return runs[key]

    return losses


SDXL_OFFLOADS = {
    "block_level in memory": {"enable_group_offload": True},
    "two blocks per group on disk": {"enable_group_offload": True, "group_offload_blocks_per_group": 2},
    "leaf_level on disk, checkpointed": {"enable_group_offload": True, "group_offload_type": "leaf_level",
                                         "gradient_checkpointing": True},
}


@pytest.mark.parametrize("name", list(SDXL_OFFLOADS))
def test_group_offload_trains_like_the_plain_run(name, tiny_model, images, tmp_path, baseline_losses):
    overrides = dict(SDXL_OFFLOADS[name])
    if "disk" in name:
        overrides["group_offload_to_disk_path"] = str(tmp_path / "offload")
    plain = {"gradient_checkpointing": True} if overrides.get("gradient_checkpointing") else {}
    expected = baseline_losses("sdxl", **plain)
    losses = run_trainer(base_config("sdxl", tiny_model("sdxl"), tmp_path, images, **overrides)).state.loss_history
    assert abs(losses[0] - expected[0]) < 1e-5
    # Later steps match too: the LoRA updates are not lost between groups' visits.
    assert losses == pytest.approx(expected, abs=1e-5)
    if "disk" in name:
        assert list((tmp_path / "offload" / "rank0").glob("group_*.safetensors"))


def test_block_swap_trains_like_the_plain_run(tiny_model, images, tmp_path, baseline_losses):
    trainer = run_trainer(base_config("flux", tiny_model("flux"), tmp_path, images, musubi_blocks_to_swap=2))
    assert trainer.state.loss_history == pytest.approx(baseline_losses("flux"), abs=1e-5)
    swapped = offload.transformer_blocks(trainer.trained.module)[-2:]
    assert all(block._forward_pre_hooks for block in swapped)


def tiny_flux_transformer():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(2, 2, 4))


def flux_forward(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return model(hidden_states=torch.randn(1, 16, 16, generator=generator),
                 encoder_hidden_states=torch.randn(1, 8, 32, generator=generator),
                 pooled_projections=torch.randn(1, 32, generator=generator), timestep=torch.tensor([0.5]),
                 img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3)).sample


def test_swapped_blocks_run_on_device_copies_and_get_their_stored_weights_back():
    model = tiny_flux_transformer()
    expected = flux_forward(model)
    groups = offload.swap_blocks(model, 3, CPU, CPU)
    block = offload.transformer_blocks(model)[-1]
    stored = block.proj_out._parameters["weight"]
    seen = []
    block.proj_out.register_forward_pre_hook(lambda module, args: seen.append(module._parameters["weight"]))
    assert torch.equal(flux_forward(model), expected)
    assert seen and seen[0] is not stored  # a copy stood in while the block ran
    assert block.proj_out._parameters["weight"] is stored and not any(group.loaded for group in groups)


def test_disk_offload_frees_the_weights_and_loads_them_for_each_call(tmp_path):
    model = tiny_flux_transformer()
    expected = flux_forward(model)
    settings = Settings({"enable_group_offload": True, "group_offload_to_disk_path": str(tmp_path)})
    offload.offload_groups(model, settings, CPU)
    weight = offload.transformer_blocks(model)[0].attn.to_q.weight
    assert weight.untyped_storage().nbytes() == weight.element_size()  # a one-element placeholder
    assert torch.allclose(flux_forward(model), expected, atol=1e-6)


def test_unets_have_no_blocks_to_swap():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                attention_head_dim=2, layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    with pytest.raises(ConfigError, match="UNet models cannot swap blocks"):
        offload.swap_blocks(unet, 1, CPU, CPU)


def test_more_swapped_blocks_than_the_model_has_is_refused():
    with pytest.raises(ConfigError, match="has 4 transformer blocks"):
        offload.swap_blocks(tiny_flux_transformer(), 5, CPU, CPU)


@pytest.mark.parametrize("values,match", [
    ({"enable_group_offload": True, "model_type": "full"}, "model_type=full"),
    ({"musubi_blocks_to_swap": 2, "model_type": "full"}, "model_type=full"),
    ({"enable_group_offload": True, "lora_init_type": "pissa"}, "reads the base weights"),
    ({"enable_group_offload": True, "group_offload_to_disk_path": "x", "base_model_precision": "int8-quanto"},
     "cannot hold quantised weights"),
    ({"enable_group_offload": True, "group_offload_type": "leaf_level", "use_dora": True}, "use_dora"),
    ({"enable_group_offload": True, "musubi_blocks_to_swap": 1}, "use one of them"),
    ({"musubi_blocks_to_swap": 1, "musubi_block_swap_device": "floppy"}, "not a device name"),
    ({"enable_model_cpu_offload": True, "train_text_encoder": True}, "train_text_encoder=true"),
])
def test_offload_settings_that_cannot_work_are_refused(values, match):
    with pytest.raises(ConfigError, match=match):
        offload.apply_offloading(None, None, Settings(values), CPU)


def test_cuda_streams_are_refused_here_with_their_requirement():
    needs = hardware.unmet("cuda")
    if needs is None:
        pytest.skip("this machine has CUDA")
    errors = validate_settings(Settings({"group_offload_use_stream": True, "max_train_steps": 1}))
    assert any(error.key == "group_offload_use_stream" and needs in str(error) for error in errors), errors
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):
        offload.check_group_offload(Settings({"enable_group_offload": True, "group_offload_use_stream": True}), CPU)


def test_a_second_cuda_device_for_swapped_blocks_is_refused_here():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):
        offload.check_block_swap(Settings({"musubi_blocks_to_swap": 1, "musubi_block_swap_device": "cuda:1"}), CPU)


@pytest.mark.parametrize("option", ["enable_model_cpu_offload", "offload_during_startup"])
def test_text_encoders_visit_the_device_only_when_called(option, tiny_model, images, tmp_path, baseline_losses,
                                                         monkeypatch):
    moves = []
    original_to = torch.nn.Module.to

    def recording_to(module, *args, **kwargs):
        moves.append((type(module).__name__, str(args[0]) if args else str(kwargs.get("device"))))
        return original_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    trainer = run_trainer(base_config("sdxl", tiny_model("sdxl"), tmp_path, images, **{option: True}))
    assert trainer.state.loss_history == pytest.approx(baseline_losses("sdxl"), abs=1e-5)
    encoder = trainer.components.text_encoders[0]
    assert isinstance(encoder._hf_hook, offload.VisitDevice)
    encoder_moves = [device for name, device in moves if name == type(encoder).__name__]
    assert "cpu" in encoder_moves and str(trainer.device) in encoder_moves
    if option == "offload_during_startup":
        assert isinstance(trainer.components.vae._hf_hook, offload.EvictFirst)


def test_tensor_slots_cover_parameters_and_buffers_once():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    slots = weight_streaming.tensor_slots([module, module[0]])
    names = sorted((slot.table, slot.name) for slot in slots)
    assert names.count(("_parameters", "weight")) == 2  # the Linear's and the BatchNorm's, not repeated
    assert ("_buffers", "running_mean") in names
