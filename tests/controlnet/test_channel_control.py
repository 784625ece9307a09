"""Channel-wise control training (control=true): the widened input layer, the settings refused up front, and
end-to-end runs whose outputs load into diffusers' FluxControlPipeline / InstructPix2Pix pipelines."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from helpers.conditioning_data import image_files, make_edge_maps, write_conditioning_dataset
from helpers.runs import base_config, train
from simpletuner.config.settings import Settings

T5_TOKENS = 32  # tokenizer_max_length for flux: the tiny T5 needs no more, and it keeps steps fast
IMAGE_COUNT = 4  # this module's copy of the session's sample images (conftest ``images``)


@pytest.fixture(scope="module")
def edges(images, tmp_path_factory):
    return make_edge_maps(images, tmp_path_factory.mktemp("edges"))


def control_config(family, model, root, images, edges, **options) -> dict:
    extra = {"tokenizer_max_length": T5_TOKENS} if family == "flux" else {}
    config = base_config(family, model, root, images, control=True, max_train_steps=2, **extra, **options)
    config["data_backend_config"] = str(write_conditioning_dataset(root, images, {"edges": (edges, "controlnet")}))
    return config


def errors_for(**values) -> list[str]:
    from simpletuner.config.validate import validate_settings

    base = {"model_family": "flux", "model_type": "lora", "control": True, "max_train_steps": 1,
            "output_dir": "/tmp/unused", "data_backend_config": "unused.json"}
    return [str(error) for error in validate_settings(Settings({**base, **values}))]


def control_image(edges, size: int = 32, index: int = 0) -> Image.Image:
    return Image.open(image_files(edges)[index]).convert("RGB").resize((size, size))


def render(pipeline, control: Image.Image, **extra) -> torch.Tensor:
    return pipeline("a red circle", control_image=control, num_inference_steps=1, height=32, width=32,
                    output_type="pt", generator=torch.Generator().manual_seed(0), max_sequence_length=T5_TOKENS,
                    **extra).images


# --- settings refused before any model loads ----------------------------------------------------------
def test_control_and_controlnet_together_are_refused_naming_both():
    messages = [m for m in errors_for(controlnet=True) if "cannot be used together" in m]
    assert messages and "controlnet" in messages[0] and "control " in messages[0]


def test_unsupported_family_and_adapters_are_refused():
    from simpletuner.training.channel_control import channel_control_problems

    assert any("model_family=auraflow" in m and "flux, sd1x, sd2x, sdxl" in m
               for m in errors_for(model_family="auraflow"))
    assert any("model_type=full" in m and "conv_in" in m for m in errors_for(model_family="sd1x"))
    lycoris = Settings({"model_family": "flux", "model_type": "lora", "control": True, "lora_type": "lycoris"})
    assert any("lora_type=lycoris" in str(error) for error in channel_control_problems(lycoris))
    assert any("lora_format=comfyui" in m for m in errors_for(lora_format="comfyui"))
    assert any("x_embedder" in m for m in errors_for(peft_lora_target_modules='["to_q", "to_k"]'))
    assert not any("x_embedder" in m for m in errors_for(peft_lora_target_modules='["to_q", "x_embedder"]'))
    img2img = Settings({"model_family": "flux", "control": True, "validation_using_datasets": True})
    assert any("validation_using_datasets" in str(error) for error in channel_control_problems(img2img))


def test_a_training_dataset_without_control_images_is_refused_naming_the_key(images, tmp_path):
    from simpletuner.data.dataset_config import DatasetConfigError, load_dataset_config

    specs_path = tmp_path / "multidatabackend.json"
    specs_path.write_text(json.dumps([
        {"id": "shapes", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "type": "local",
         "cache_dir": str(tmp_path / "text")}]))
    settings = Settings({"model_family": "flux", "control": True})
    with pytest.raises(DatasetConfigError) as raised:
        load_dataset_config(str(specs_path), settings)
    assert "control=true needs a control image" in str(raised.value) and "conditioning_data" in str(raised.value)


# --- the widened input layer --------------------------------------------------------------------------
def loaded(family_name: str, model: str, **values):
    from simpletuner.models.registry import get_family
    from simpletuner.training.model_setup import prepare_components

    settings = Settings({"model_family": family_name, "pretrained_model_name_or_path": model, "control": True,
                         "mixed_precision": "no", "tokenizer_max_length": T5_TOKENS, **values})
    family = get_family(family_name)(settings)
    components = family.load(torch.device("cpu"), torch.float32)
    prepare_components(family, components, settings, torch.device("cpu"))
    return family, components


# family -> (input layer, its width before and after, latent grid)
WIDENED = {"flux": ("x_embedder", 64, 128, (16, 4, 4)), "sd1x": ("conv_in", 4, 8, (4, 8, 8))}


@pytest.mark.parametrize("family_name", list(WIDENED))
def test_the_input_layer_is_widened_with_a_zero_half_and_starts_as_the_base_model(family_name, tiny_model):
    from simpletuner.data.types import TrainingBatch
    from simpletuner.training.channel_control import CHANNEL_CONTROL_KINDS, widen_input_layer

    layer_name, single, double, grid = WIDENED[family_name]
    family, components = loaded(family_name, tiny_model(family_name))
    denoiser = components.denoiser
    layer = getattr(denoiser, layer_name)
    assert layer.weight.shape[1] == double and denoiser.config.in_channels == double
    assert denoiser.config.out_channels == single
    assert torch.count_nonzero(layer.weight[:, single:]) == 0
    assert not widen_input_layer(denoiser, CHANNEL_CONTROL_KINDS[family_name], grid[0]), "widened twice"
    text = family.encode_text(["a red circle"])
    noisy, timesteps = torch.randn(1, *grid), torch.tensor([500])

    def batch(control: torch.Tensor | None = None) -> TrainingBatch:
        return TrainingBatch(noisy, text, [(64, 64)], [(0, 0)], [(64, 64)], ["a"], conditioning_latents=control)

    first = family.predict(batch(torch.randn(1, *grid)), noisy, timesteps)
    assert first.shape == noisy.shape
    assert torch.allclose(first, family.predict(batch(torch.randn(1, *grid)), noisy, timesteps))  # zero half
    with torch.no_grad():
        layer.weight[:, single:].normal_()
    assert not torch.allclose(first, family.predict(batch(torch.randn(1, *grid)), noisy, timesteps))
    with pytest.raises(ValueError, match="control latents"):
        family.predict(batch(), noisy, timesteps)


def test_flux_control_lora_wraps_x_embedder(tiny_model):
    from simpletuner.training.trainable import make_trainable

    family, _ = loaded("flux", tiny_model("flux"), lora_rank=2, flux_lora_target="mmdit")
    trainable = make_trainable(family, family.settings)
    trainable.attach()
    state = trainable.state_dict(trainable.module)
    assert state["x_embedder.lora_A.weight"].shape == (2, 128)


# --- end to end ---------------------------------------------------------------------------------------
def test_flux_control_lora_trains_and_loads_into_flux_control_pipeline(tiny_model, images, edges, tmp_path):
    from diffusers import FluxControlPipeline

    from simpletuner.validation.control import cover_crop

    model = tiny_model("flux")
    config = control_config("flux", model, tmp_path, images, edges, validation_prompt="a red circle",
                            validation_step_interval=2, validation_resolution="32", num_validation_images=1,
                            validation_num_inference_steps=1, validation_disable_unconditional=True,
                            disable_benchmark=True)
    assert train(config).global_step == 2
    saved = Image.open(tmp_path / "output" / "validation_images" / "step000002_validation_32x32_0.png")
    shown_control = saved.convert("RGB").crop((0, 0, 32, 32))  # the control image beside the render (left)
    expected = cover_crop(Image.open(image_files(edges)[0]).convert("RGB"), 32, 32)
    assert saved.size == (64, 32) and list(shown_control.getdata()) == list(expected.getdata())
    pipeline = FluxControlPipeline.from_pretrained(model)
    assert pipeline.transformer.config.in_channels == 64
    pipeline.load_lora_weights(str(tmp_path / "output"))
    assert pipeline.transformer.config.in_channels == 128  # diffusers widened x_embedder for the control LoRA
    rendered = render(pipeline, control_image(edges))
    assert rendered.shape == (1, 3, 32, 32)
    assert not torch.allclose(rendered, render(pipeline, control_image(edges, index=1)))


def test_flux_full_control_model_saves_a_flux_control_pipeline(tiny_model, images, edges, tmp_path):
    from diffusers import FluxControlPipeline

    config = control_config("flux", tiny_model("flux"), tmp_path, images, edges, model_type="full",
                            optimizer="optimi-adamw", learning_rate=1e-3)
    assert train(config).global_step == 2
    index = json.loads((tmp_path / "output" / "model_index.json").read_text())
    assert index["_class_name"] == "FluxControlPipeline"
    pipeline = FluxControlPipeline.from_pretrained(str(tmp_path / "output"))
    transformer = pipeline.transformer
    assert transformer.config.in_channels == 128 and transformer.x_embedder.in_features == 128
    assert torch.count_nonzero(transformer.x_embedder.weight[:, 64:]) > 0, "the control half did not train"
    rendered = render(pipeline, control_image(edges))
    assert rendered.shape == (1, 3, 32, 32)
    assert not torch.allclose(rendered, render(pipeline, control_image(edges, index=1)))


PIX2PIX = {"sd1x": "StableDiffusionInstructPix2PixPipeline", "sdxl": "StableDiffusionXLInstructPix2PixPipeline"}


@pytest.mark.parametrize("family", list(PIX2PIX))
def test_unet_full_control_model_saves_an_instruct_pix2pix_pipeline(family, tiny_model, images, edges, tmp_path):
    import diffusers

    config = control_config(family, tiny_model(family), tmp_path, images, edges, model_type="full",
                            optimizer="optimi-adamw", learning_rate=1e-3, validation_prompt="a red circle",
                            validation_step_interval=2, validation_resolution="64", num_validation_images=1,
                            validation_num_inference_steps=2, disable_benchmark=True)
    assert train(config).global_step == 2
    assert (tmp_path / "output" / "validation_images" / "step000002_validation_64x64_0.png").exists()
    index = json.loads((tmp_path / "output" / "model_index.json").read_text())
    assert index["_class_name"] == PIX2PIX[family]
    pipeline = getattr(diffusers, PIX2PIX[family]).from_pretrained(str(tmp_path / "output"))
    unet = pipeline.unet
    assert unet.config.in_channels == 8 and unet.conv_in.in_channels == 8 and unet.config.out_channels == 4
    assert torch.count_nonzero(unet.conv_in.weight[:, 4:]) > 0, "the control half did not train"

    def edit(index: int) -> torch.Tensor:
        return pipeline("a red circle", image=control_image(edges, 64, index), num_inference_steps=2,
                        output_type="pt", generator=torch.Generator().manual_seed(0)).images

    rendered = edit(0)
    assert rendered.shape == (1, 3, 64, 64)
    assert not torch.allclose(rendered, edit(1))


def test_resumed_control_lora_matches_the_straight_run(tiny_model, images, edges, tmp_path):
    from safetensors.torch import load_file

    config = control_config("flux", tiny_model("flux"), tmp_path, images, edges, checkpoint_step_interval=1,
                            resume_from_checkpoint="none")
    train(config)
    weights = tmp_path / "output" / "pytorch_lora_weights.safetensors"
    straight = load_file(str(weights))
    weights.unlink()
    assert train({**config, "resume_from_checkpoint": "latest"}).global_step == 2
    resumed = load_file(str(weights))
    assert straight.keys() == resumed.keys() and "transformer.x_embedder.lora_A.weight" in straight
    for key in straight:
        assert torch.allclose(straight[key], resumed[key], atol=1e-6), key
