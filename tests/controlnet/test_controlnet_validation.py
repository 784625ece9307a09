"""Validation of ControlNet runs: renders through the ControlNet pipeline with a training image's control image."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from PIL import Image, ImageDraw

from helpers.conditioning_data import image_files, make_edge_maps, write_conditioning_dataset
from helpers.runs import base_config, train
from simpletuner.config.settings import Settings

T5_TOKENS = 32  # tokenizer_max_length for flux: the tiny T5 needs no more, and it keeps steps fast
IMAGE_COUNT = 4  # this module's copy of the session's sample images (conftest ``images``)
FAMILIES = ["sdxl", "flux", "sd1x", "sd3", "sana", "pixart_sigma"]
FAMILY_OPTIONS = {"flux": {"tokenizer_max_length": T5_TOKENS}, "sd3": {"tokenizer_max_length": T5_TOKENS},
                  "pixart_sigma": {"tokenizer_max_length": T5_TOKENS}}


@pytest.fixture(scope="module")
def edges(images, tmp_path_factory):
    return make_edge_maps(images, tmp_path_factory.mktemp("edges"))


@pytest.fixture(scope="module")
def tiny_models(tiny_model):
    return {family: tiny_model(family) for family in FAMILIES}


def panels(path, count: int) -> list[Image.Image]:
    image = Image.open(path).convert("RGB")
    assert image.size == (64 * count, 64), f"expected {count} panels of 64x64"
    width = image.width // count
    return [image.crop((i * width, 0, (i + 1) * width, image.height)) for i in range(count)]


def write_unet_lora(model: str, folder) -> str:
    """A LoRA for the tiny SDXL's UNet with random (non-zero) up matrices, as a diffusers folder."""
    from peft import get_peft_model_state_dict

    from simpletuner.models.registry import get_family
    from simpletuner.training import adapters

    settings = Settings({"model_family": "sdxl", "pretrained_model_name_or_path": model})
    family = get_family("sdxl")(settings)
    unet = family.load(torch.device("cpu"), torch.float32).denoiser
    unet.add_adapter(adapters.lora_config(Settings({"lora_rank": 4}), family.lora_target_modules()))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    family.save_lora(str(folder), get_peft_model_state_dict(unet))
    return str(folder)


# sdxl: LoRA ControlNet with the base benchmark and a validation adapter on the frozen UNet, control image on the
# left; flux: full ControlNet, no benchmark, control image on the right.
RUNS = {
    "sdxl": ({"model_type": "lora", "validation_adapter_mode": "comparison"}, "left", 4),
    "flux": ({"model_type": "full", "disable_benchmark": True, "validation_stitch_input_location": "right"},
             "right", 2),
}


@pytest.mark.parametrize("family", list(RUNS))
def test_controlnet_run_writes_validation_images_beside_its_control_image(family, tiny_models, images, edges,
                                                                          tmp_path):
    from simpletuner.validation.control import cover_crop

    options, location, count = RUNS[family]
    if "validation_adapter_mode" in options:
        options = {**options, "validation_adapter_path": write_unet_lora(tiny_models[family], tmp_path / "lora")}
    config = base_config(family, tiny_models[family], tmp_path, images, controlnet=True, max_train_steps=2,
                         validation_prompt="a red circle", validation_step_interval=2, validation_resolution="64",
                         num_validation_images=1, validation_num_inference_steps=2,
                         validation_disable_unconditional=True, **FAMILY_OPTIONS.get(family, {}), **options)
    config["data_backend_config"] = str(write_conditioning_dataset(tmp_path, images, {"edges": (edges, "controlnet")}))
    assert train(config).global_step == 2
    folder = tmp_path / "output" / "validation_images"
    assert sorted(p.name for p in folder.iterdir()) == ["step000002_validation_64x64_0.png"]
    shown = panels(folder / "step000002_validation_64x64_0.png", count)
    control, rendered = (shown[0], shown[-1]) if location == "left" else (shown[-1], shown[0])
    # The control image is the edge map of the first training image (by path), covering the render size.
    expected = cover_crop(Image.open(image_files(edges)[0]).convert("RGB"), 64, 64)
    assert list(control.get_flattened_data()) == list(expected.get_flattened_data())
    assert list(rendered.get_flattened_data()) != list(control.get_flattened_data())
    if count == 4:  # control, benchmark, trained ControlNet, trained ControlNet + the UNet adapter
        assert list(shown[3].get_flattened_data()) != list(shown[2].get_flattened_data())


def load_controlled(family_name: str, model: str):
    """The family's loaded components with a ControlledDenoiser whose ControlNet outputs are not zero."""
    from simpletuner.models.registry import get_family
    from simpletuner.training.model_setup import prepare_components
    from simpletuner.training.trainable import make_trainable

    settings = Settings({"model_family": family_name, "pretrained_model_name_or_path": model, "controlnet": True,
                         "model_type": "full", "mixed_precision": "no", "vae_dtype": "fp32",
                         "validation_num_inference_steps": 2, **FAMILY_OPTIONS.get(family_name, {})})
    family = get_family(family_name)(settings)
    components = family.load(torch.device("cpu"), torch.float32)
    prepare_components(family, components, settings, torch.device("cpu"))
    trainable = make_trainable(family, settings)
    trainable.attach()
    controlled = trainable.module
    torch.manual_seed(0)
    with torch.no_grad():  # a fresh ControlNet's own layers start at zero, so no control image would matter yet
        for name, parameter in controlled.controlnet.named_parameters():
            if name.startswith(controlled.kind.own_modules):
                parameter.normal_(0, 0.3)
    controlled.eval()
    return family, controlled, settings


def bar_image(box: tuple[int, int, int, int]) -> Image.Image:
    image = Image.new("RGB", (96, 64), "black")
    ImageDraw.Draw(image).rectangle(box, fill="white")
    return image


@pytest.mark.parametrize("family_name", FAMILIES)
def test_the_render_follows_the_control_image(family_name, tiny_models):
    from simpletuner.validation.control import ControlImage
    from simpletuner.validation.images import RenderKey
    from simpletuner.validation.prompts import ValidationPrompt
    from simpletuner.validation.renderer import Renderer

    family, controlled, settings = load_controlled(family_name, tiny_models[family_name])
    prompt, key = ValidationPrompt("validation", "a red circle"), RenderKey("validation", 64, 64, 0)

    def render(control: Image.Image) -> list:
        renderer = Renderer(family, controlled, settings, torch.device("cpu"), 3, nullcontext,
                            control_image=ControlImage(control, "test"))
        assert type(renderer.pipeline).__name__.endswith("ControlNetPipeline")
        image = renderer.render(prompt, key)
        assert image.size == (64, 64)
        return list(image.get_flattened_data())

    left = render(bar_image((0, 0, 40, 64)))
    assert render(bar_image((56, 0, 96, 64))) != left
    assert render(bar_image((0, 0, 40, 64))) == left


def test_cover_crop_fills_the_size_around_the_centre():
    from simpletuner.validation.control import cover_crop

    image = Image.new("RGB", (300, 100), (255, 0, 0))
    ImageDraw.Draw(image).rectangle((100, 0, 199, 99), fill=(0, 255, 0))  # the centre square
    cropped = cover_crop(image, 32, 32)
    assert cropped.size == (32, 32)
    assert all(cropped.getpixel((x, 16))[1] > 200 for x in (2, 16, 29))  # only the centre square is left
    tall = cover_crop(image, 30, 60)  # scaled up to cover the height
    assert tall.size == (30, 60) and tall.getpixel((15, 30))[1] > 200


def test_controlnet_pipeline_options_are_checked_against_the_controlnet_pipeline():
    from simpletuner.validation.checks import validation_errors

    values = {"model_family": "sdxl", "validation_prompt": "a cat", "validation_guidance_rescale": 0.7}
    assert validation_errors(Settings(values)) == []
    errors = validation_errors(Settings({**values, "controlnet": True}))
    assert [error.key for error in errors] == ["validation_guidance_rescale"]
    assert "StableDiffusionXLControlNetPipeline" in str(errors[0])


def test_a_run_without_a_control_image_is_told_how_to_fix_it():
    from simpletuner.config.errors import ConfigError
    from simpletuner.validation.control import first_control_image

    with pytest.raises(ConfigError, match="conditioning_data"):
        first_control_image(None, {})
