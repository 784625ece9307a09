"""ControlNets for Sana (diffusers' SanaControlNetModel) and PixArt Sigma (ours, models/pixart_controlnet.py):
built from the base transformer, trained on a conditioning dataset, saved, reloaded and rendered with."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from helpers.conditioning_data import image_files, make_edge_maps, write_conditioning_dataset
from helpers.runs import base_config, run_trainer
from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings

IMAGE_COUNT = 4  # this module's copy of the session's sample images (conftest ``images``)
PIXART_TOKENS = 32  # tokenizer_max_length for the tiny T5: short prompts keep the steps fast


@pytest.fixture(scope="module")
def edges(images, tmp_path_factory):
    return make_edge_maps(images, tmp_path_factory.mktemp("edges"))


def family_options(family: str) -> dict:
    return {"tokenizer_max_length": PIXART_TOKENS} if family == "pixart_sigma" else {}


def controlnet_run(family, model, images, edges, root, **options):
    """Train a ControlNet for a few steps; returns the finished Trainer."""
    options = {"max_train_steps": 2, **family_options(family), **options}
    config = base_config(family, model, root, images, controlnet=True, **options)
    config["data_backend_config"] = str(write_conditioning_dataset(root, images, {"edges": (edges, "controlnet")}))
    trainer = run_trainer(config)
    assert trainer.state.global_step == options["max_train_steps"]
    return trainer


def call_arguments(family: str) -> dict:
    from simpletuner.models.registry import get_family

    return get_family(family)(Settings({"model_family": family, **family_options(family)})).pipeline_call_arguments()


def render(pipeline, family: str, size: int, scale: float | None = None, control: Image.Image | None = None):
    extra = {} if scale is None else {"control_image": control, "controlnet_conditioning_scale": scale}
    return pipeline("a red circle", num_inference_steps=2, height=size, width=size, output_type="pt",
                    generator=torch.Generator().manual_seed(0), guidance_scale=1.0, **call_arguments(family),
                    **extra).images


def control_image(edges, size: int) -> Image.Image:
    return Image.open(image_files(edges)[0]).convert("RGB").resize((size, size))


def loaded(family_name: str, model: str, **values):
    from simpletuner.models.registry import get_family

    settings = Settings({"model_family": family_name, "pretrained_model_name_or_path": model, "controlnet": True,
                         "model_type": "full", "mixed_precision": "no", **family_options(family_name), **values})
    family = get_family(family_name)(settings)
    family.load(torch.device("cpu"), torch.float32)
    return family, settings


# --- Sana -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["full", "lora"])
def test_sana_controlnet_trains_and_steers_sana_controlnet_pipeline(model_type, tiny_model, images, edges,
                                                                    tmp_path):
    from diffusers import SanaControlNetModel, SanaControlNetPipeline

    controlnet_run("sana", tiny_model("sana"), images, edges, tmp_path, model_type=model_type)
    controlnet = SanaControlNetModel.from_pretrained(str(tmp_path / "output" / "controlnet"))
    assert any(p.abs().sum() > 0 for p in controlnet.controlnet_blocks.parameters()), "output layers did not train"
    pipeline = SanaControlNetPipeline.from_pretrained(tiny_model("sana"), controlnet=controlnet)
    control = control_image(edges, 32)
    steered, plain = render(pipeline, "sana", 32, 1.0, control), render(pipeline, "sana", 32, 0.0, control)
    assert steered.shape == (1, 3, 32, 32)
    assert not torch.allclose(steered, plain), "the trained ControlNet did not change the image"


def test_sana_controlnet_copies_the_transformer_and_honours_the_custom_config(tiny_model):
    from simpletuner.training.controlnet_model import build_controlnet

    family, settings = loaded("sana", tiny_model("sana"))
    transformer = family.components.denoiser
    controlnet = build_controlnet(family, transformer, settings)
    assert len(controlnet.transformer_blocks) == 1  # one fewer than the tiny transformer's two
    copied = transformer.state_dict()
    for name, tensor in controlnet.state_dict().items():
        if name.startswith(("input_block", "controlnet_blocks")):
            assert not tensor.any(), f"{name} must start at zero"
        else:
            assert torch.equal(tensor, copied[name]), name
    with pytest.raises(ConfigError, match="num_layers=2"):
        build_controlnet(family, transformer, settings.replace(controlnet_custom_config='{"num_layers": 2}'))
    reshaped = build_controlnet(family, transformer, settings.replace(controlnet_custom_config='{"dropout": 0.1}'))
    assert reshaped.config.dropout == 0.1 and torch.equal(reshaped.patch_embed.proj.weight,
                                                          transformer.patch_embed.proj.weight)


def test_sana_transformers_the_controlnet_cannot_reproduce_are_refused(tiny_model):
    from simpletuner.training.controlnet_model import build_controlnet

    family, settings = loaded("sana", tiny_model("sana"))
    transformer = family.components.denoiser
    transformer.register_to_config(qk_norm="rms_norm_across_heads")
    with pytest.raises(ConfigError, match="qk_norm"):
        build_controlnet(family, transformer, settings)


# --- PixArt Sigma -----------------------------------------------------------------------------------
def test_pixart_controlnet_trains_reloads_and_steers_its_pipeline(tiny_model, images, edges, tmp_path):
    from diffusers import PixArtSigmaPipeline

    from simpletuner.models.pixart_controlnet import PixArtControlNetModel
    from simpletuner.models.pixart_controlnet_pipeline import PixArtSigmaControlNetPipeline

    model = tiny_model("pixart_sigma")
    trainer = controlnet_run("pixart_sigma", model, images, edges, tmp_path, model_type="full", max_train_steps=3,
                             gradient_checkpointing=True, validation_prompt="a red circle",
                             validation_step_interval=3, validation_resolution="32", num_validation_images=1,
                             validation_num_inference_steps=2, validation_disable_unconditional=True,
                             disable_benchmark=True)
    trained = trainer.trained.module
    assert not any(p.requires_grad for p in trained.denoiser.parameters()), "the base transformer must stay frozen"
    original = PixArtSigmaPipeline.from_pretrained(model).transformer.state_dict()
    assert all(torch.equal(tensor, original[name]) for name, tensor in trained.denoiser.state_dict().items())
    with Image.open(tmp_path / "output" / "validation_images" / "step000003_validation_32x32_0.png") as shown:
        assert shown.size == (64, 32)  # the control image beside the 32px render
    reloaded = PixArtControlNetModel.from_pretrained(str(tmp_path / "output" / "controlnet"))
    live = trained.controlnet.state_dict()
    assert reloaded.state_dict().keys() == live.keys()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, live[name]), name
    assert reloaded.controlnet_cond_embedding.weight.abs().sum() > 0, "the control embedding did not train"

    pipeline = PixArtSigmaControlNetPipeline.from_pretrained(model, controlnet=reloaded)
    left, right = Image.new("RGB", (32, 32)), Image.new("RGB", (32, 32))
    left.paste((255, 255, 255), (0, 0, 12, 32))
    right.paste((255, 255, 255), (20, 0, 32, 32))
    steered = render(pipeline, "pixart_sigma", 32, 1.0, left)
    assert steered.shape == (1, 3, 32, 32)
    assert not torch.allclose(steered, render(pipeline, "pixart_sigma", 32, 1.0, right)), "control image ignored"
    unscaled = render(pipeline, "pixart_sigma", 32, 0.0, left)
    base = render(PixArtSigmaPipeline.from_pretrained(model), "pixart_sigma", 32)
    assert torch.allclose(unscaled, base, atol=1e-6), "scale 0 must give the base model's image"
    assert not any(block._forward_hooks for block in pipeline.transformer.transformer_blocks)
    # Classifier-free guidance doubles the transformer batch; two images per prompt take one control image each.
    pair = pipeline("a red circle", control_image=[left, right], num_images_per_prompt=2, num_inference_steps=2,
                    height=32, width=32, output_type="pt", generator=torch.Generator().manual_seed(0),
                    guidance_scale=4.0, **call_arguments("pixart_sigma")).images
    assert pair.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="control images do not fit"):
        pipeline("a red circle", control_image=[left, right, left], num_images_per_prompt=2, num_inference_steps=1,
                 height=32, width=32, output_type="pt", **call_arguments("pixart_sigma"))


def test_a_new_pixart_controlnet_leaves_the_base_output_unchanged(tiny_model):
    from simpletuner.models.controlnets import controlnet_kind
    from simpletuner.models.pixart import SIGMA_ADDED_CONDITIONS
    from simpletuner.training.controlnet_model import ControlledDenoiser, build_controlnet

    family, settings = loaded("pixart_sigma", tiny_model("pixart_sigma"))
    transformer = family.components.denoiser.eval()
    controlnet = build_controlnet(family, transformer, settings).eval()
    controlled = ControlledDenoiser(transformer, controlnet, controlnet_kind("pixart_sigma"))
    generator = torch.Generator().manual_seed(0)
    latents, control = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    inputs = dict(encoder_hidden_states=torch.randn(2, 5, 32, generator=generator),
                  encoder_attention_mask=torch.ones(2, 5), timestep=torch.tensor([10, 700]),
                  added_cond_kwargs=dict(SIGMA_ADDED_CONDITIONS), return_dict=False)
    with torch.no_grad():
        base = transformer(latents, **inputs)[0]
        assert torch.allclose(controlled(latents, control=control, **inputs)[0], base, atol=1e-6)
        for parameter in controlnet.controlnet_blocks.parameters():
            parameter.normal_(0, 0.3)
        steered = controlled(latents, control=control, **inputs)[0]
    assert not torch.allclose(steered, base, atol=1e-3), "non-zero residuals must reach the transformer"
    assert not any(block._forward_hooks for block in transformer.transformer_blocks), "hooks must be removed"
    with torch.no_grad():
        assert torch.equal(transformer(latents, **inputs)[0], base)


def test_pixart_controlnet_layers_come_from_the_transformer_and_the_custom_config(tiny_model):
    from simpletuner.training.controlnet_model import build_controlnet

    family, settings = loaded("pixart_sigma", tiny_model("pixart_sigma"))
    transformer = family.components.denoiser
    assert len(build_controlnet(family, transformer, settings).transformer_blocks) == 1  # half of two
    both = build_controlnet(family, transformer, settings.replace(
        controlnet_custom_config='{"num_layers": 2, "dropout": 0.1}'))
    assert len(both.transformer_blocks) == 2 and both.config.dropout == 0.1
    second = transformer.transformer_blocks[1]
    assert torch.equal(both.transformer_blocks[1].attn1.to_q.weight, second.attn1.to_q.weight)
    assert torch.equal(both.caption_projection.linear_1.weight, transformer.caption_projection.linear_1.weight)
    with pytest.raises(ConfigError, match="num_layers=3") as refused:
        build_controlnet(family, transformer, settings.replace(controlnet_custom_config='{"num_layers": 3}'))
    assert refused.value.key == "controlnet_custom_config"


def test_pixart_lora_controlnet_is_merged_into_a_plain_controlnet(tiny_model, images, edges, tmp_path):
    from simpletuner.models.pixart_controlnet import PixArtControlNetModel

    trainer = controlnet_run("pixart_sigma", tiny_model("pixart_sigma"), images, edges, tmp_path, model_type="lora")
    names = {name for name, p in trainer.trained.module.controlnet.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in names) and "controlnet_cond_embedding.weight" in names
    saved = PixArtControlNetModel.from_pretrained(str(tmp_path / "output" / "controlnet"))
    assert not any("lora" in name for name in saved.state_dict())
