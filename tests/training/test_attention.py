"""attention_mechanism, sageattention_usage and unet_attention_slice."""

from __future__ import annotations

import pytest
import torch

from helpers.runs import base_config, run_trainer
from simpletuner.config import hardware
from simpletuner.config.errors import ConfigError
from simpletuner.config.options import OPTIONS
from simpletuner.config.settings import Settings
from simpletuner.config.validate import validate_settings
from simpletuner.training import attention

CPU = torch.device("cpu")
IMAGE_COUNT = 4  # sample images in this module's copy (the `images` fixture in tests/conftest.py)


@pytest.fixture(scope="module")
def sdxl(tiny_model):
    return tiny_model("sdxl")


@pytest.fixture(scope="module")
def baseline(sdxl, images, tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline")
    return run_trainer(base_config("sdxl", sdxl, root, images, max_train_steps=2)).state.loss_history


@pytest.fixture
def restore_dispatch_backend():
    """set_attention_backend also changes diffusers' process-wide default; put it back after the test."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry.get_active_backend()[0]
    yield
    _AttentionBackendRegistry.set_active_backend(active)


def kernel_flags() -> dict[str, bool]:
    return {"math": torch.backends.cuda.math_sdp_enabled(), "flash": torch.backends.cuda.flash_sdp_enabled()}


@pytest.mark.parametrize("mechanism,inside", [("native-math", {"math": True, "flash": False}),
                                              ("native-flash", {"math": False, "flash": True})])
def test_native_kernels_train_sdxl_like_the_default(mechanism, inside, sdxl, images, tmp_path, baseline):
    trainer = run_trainer(base_config("sdxl", sdxl, tmp_path, images, max_train_steps=2,
                                      attention_mechanism=mechanism))
    assert trainer.state.loss_history == pytest.approx(baseline, abs=1e-5)
    unet = trainer.trained.module
    seen = []
    first = attention.attention_modules(unet)[0]
    first.to_out[0].register_forward_pre_hook(lambda module, args: seen.append(kernel_flags()))
    outside = kernel_flags()
    first(torch.randn(1, 16, first.to_q.in_features))
    assert seen == [inside]  # the kernel is pinned while the attention layer runs...
    assert kernel_flags() == outside  # ...and released afterwards


def test_unet_attention_slice_trains_sdxl(sdxl, images, tmp_path, baseline):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    trainer = run_trainer(base_config("sdxl", sdxl, tmp_path, images, max_train_steps=2,
                                      unet_attention_slice=True))
    assert trainer.state.loss_history == pytest.approx(baseline, abs=1e-4)
    processors = trainer.trained.module.attn_processors.values()
    assert all(isinstance(processor, SlicedAttnProcessor) for processor in processors)


def tiny_flux_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(2, 2, 4))


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                attention_head_dim=2, layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def test_flex_is_refused_on_this_machine_naming_the_requirement():
    if hardware.unmet("cuda") is None:
        pytest.skip("this machine has CUDA")
    for purpose in ("training", "inference"):
        with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):
            attention.select_attention(tiny_flux_transformer(), Settings({"attention_mechanism": "flex"}), CPU,
                                       purpose=purpose)


def test_flex_selects_the_dispatcher_backend_where_it_runs(restore_dispatch_backend, monkeypatch):
    monkeypatch.setattr(hardware, "unmet", lambda requirement: None)  # as on a CUDA machine, but the device is CPU
    model = tiny_flux_transformer()
    settings = Settings({"attention_mechanism": "flex"})
    with pytest.raises(ConfigError, match="no backward pass on cpu"):
        attention.select_attention(model, settings, CPU, purpose="training")
    attention.select_attention(model, settings, CPU, purpose="inference")  # forward-only flex runs on a CPU
    backends = {module.processor._attention_backend for module in attention.attention_modules(model)}
    assert {str(getattr(backend, "value", backend)) for backend in backends} == {"flex"}


def test_dispatcher_backends_are_refused_for_unets(monkeypatch):
    monkeypatch.setattr(hardware, "unmet", lambda requirement: None)
    unet = tiny_unet()
    assert not attention.uses_dispatcher(unet) and attention.uses_dispatcher(tiny_flux_transformer())
    with pytest.raises(ConfigError, match="calls PyTorch SDPA directly"):
        attention.select_attention(unet, Settings({"attention_mechanism": "flex"}), CPU, purpose="inference")


def test_sageattention_is_only_used_where_sageattention_usage_allows():
    needs = hardware.unmet("sageattention")
    if needs is None:
        pytest.skip("this machine has SageAttention")
    unet = tiny_unet()
    inference_only = Settings({"attention_mechanism": "sageattention", "sageattention_usage": "inference"})
    attention.select_attention(unet, inference_only, CPU, purpose="training")  # left alone while training
    with pytest.raises(ConfigError, match=needs):
        attention.select_attention(unet, inference_only, CPU, purpose="inference")
    with pytest.raises(ConfigError, match=needs):
        training = inference_only.replace(sageattention_usage="training+inference")
        attention.select_attention(unet, training, CPU, purpose="training")


def test_slicing_is_refused_where_it_cannot_apply():
    with pytest.raises(ConfigError, match="applies to UNet models"):
        attention.slice_unet_attention(tiny_flux_transformer(), Settings({}))
    with pytest.raises(ConfigError, match="would do nothing"):
        attention.slice_unet_attention(tiny_unet(), Settings({"attention_mechanism": "native-math"}))


MECHANISM = OPTIONS["attention_mechanism"]
GATED = sorted((choice, key) for choice, key in MECHANISM.gated_choices.items()
               if choice not in MECHANISM.planned_choices)


@pytest.mark.parametrize("mechanism,requirement", GATED)
def test_hardware_bound_mechanisms_are_refused_with_their_requirement(mechanism, requirement):
    needs = hardware.unmet(requirement)
    if needs is None:
        pytest.skip(f"this machine has {requirement}")
    errors = validate_settings(Settings({"attention_mechanism": mechanism, "max_train_steps": 1}))
    assert any(error.key == "attention_mechanism" and needs in str(error) for error in errors), errors
    settings = Settings({"attention_mechanism": mechanism, "sageattention_usage": "training"})
    with pytest.raises(ConfigError, match="needs"):
        attention.select_attention(tiny_unet(), settings, CPU, purpose="training")


def test_sla_is_a_planned_choice():
    errors = validate_settings(Settings({"attention_mechanism": "sla", "max_train_steps": 1}))
    assert any("not implemented yet" in str(error) for error in errors)
