"""End to end: a ControlNet trains on tiny models with an edge-map conditioning dataset, and the matching
diffusers ControlNet pipeline loads the saved ControlNet and renders with it."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from helpers.conditioning_data import image_files, make_edge_maps, make_half_masks, write_conditioning_dataset
from helpers.runs import base_config, train

T5_TOKENS = 32  # tokenizer_max_length for flux and sd3: the tiny T5 needs no more, and it keeps steps fast
FAMILIES = ["sdxl", "sd1x", "flux", "sd3"]
PIPELINES = {"sdxl": "StableDiffusionXLControlNetPipeline", "sd1x": "StableDiffusionControlNetPipeline",
             "flux": "FluxControlNetPipeline", "sd3": "StableDiffusion3ControlNetPipeline"}
CONTROLNETS = {"sdxl": "ControlNetModel", "sd1x": "ControlNetModel", "flux": "FluxControlNetModel",
               "sd3": "SD3ControlNetModel"}
# (model_type, extra options) per family: LoRA and full runs, a Flux ControlNet preset and a custom config.
RUNS = {
    "sdxl": ("lora", {}),
    "sd1x": ("full", {"gradient_checkpointing": True}),
    "flux": ("lora", {"flux_lora_target": "all+ffs+embedder+controlnet", "tokenizer_max_length": T5_TOKENS}),
    "sd3": ("full", {"tokenizer_max_length": T5_TOKENS, "controlnet_custom_config": '{"num_layers": 1}'}),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from simpletuner.demo.sample_data import make_sample_images

    folder = tmp_path_factory.mktemp("images")
    make_sample_images(str(folder), count=4)
    return folder


@pytest.fixture(scope="module")
def edges(images, tmp_path_factory):
    return make_edge_maps(images, tmp_path_factory.mktemp("edges"))


@pytest.fixture(scope="module")
def masks(images, tmp_path_factory):
    return make_half_masks(images, tmp_path_factory.mktemp("masks"))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from simpletuner.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("models")
    return {family: build_tiny(family, str(root / family)) for family in FAMILIES}


def render(pipeline, family: str, control: Image.Image, scale: float) -> torch.Tensor:
    argument = "image" if family in ("sdxl", "sd1x") else "control_image"
    extra = {"max_sequence_length": T5_TOKENS} if family in ("flux", "sd3") else {}
    return pipeline("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                    generator=torch.Generator().manual_seed(0), guidance_scale=1.0,
                    controlnet_conditioning_scale=scale, **{argument: control}, **extra).images


def controlnet_config(family, tiny_models, images, root, conditioning, **options) -> dict:
    options = {"max_train_steps": 2, **options}
    config = base_config(family, tiny_models[family], root, images, controlnet=True, **options)
    config["data_backend_config"] = str(write_conditioning_dataset(root, images, conditioning))
    return config


@pytest.mark.parametrize("family", FAMILIES)
def test_controlnet_trains_saves_and_steers_the_pipeline(family, tiny_models, images, edges, masks, tmp_path):
    import diffusers

    model_type, options = RUNS[family]
    conditioning = {"edges": (edges, "controlnet")}
    if family == "sd1x":  # a loss mask dataset beside the control images
        conditioning["masks"] = (masks, "mask")
    config = controlnet_config(family, tiny_models, images, tmp_path, conditioning, model_type=model_type, **options)
    state = train(config)
    assert state.global_step == 2
    saved = tmp_path / "output" / "controlnet"
    assert (saved / "config.json").exists()
    controlnet = getattr(diffusers, CONTROLNETS[family]).from_pretrained(str(saved))
    zero_initialised = [p for name, p in controlnet.named_parameters()
                        if name.startswith(("controlnet_down_blocks", "controlnet_blocks"))]
    assert any(p.abs().sum() > 0 for p in zero_initialised), "the ControlNet's output layers did not train"
    pipeline = getattr(diffusers, PIPELINES[family]).from_pretrained(tiny_models[family], controlnet=controlnet)
    control = Image.open(image_files(edges)[0]).convert("RGB").resize((64, 64))
    steered, plain = render(pipeline, family, control, 1.0), render(pipeline, family, control, 0.0)
    assert steered.shape == plain.shape and steered.shape[-1] == 64
    assert not torch.allclose(steered, plain), "the trained ControlNet did not change the image"


def test_resumed_controlnet_run_matches_the_straight_run(tiny_models, images, edges, tmp_path):
    from safetensors.torch import load_file

    config = controlnet_config("sdxl", tiny_models, images, tmp_path, {"edges": (edges, "controlnet")},
                               max_train_steps=4, checkpoint_step_interval=2, resume_from_checkpoint="none")
    train(config)
    weights = tmp_path / "output" / "controlnet" / "diffusion_pytorch_model.safetensors"
    straight = load_file(str(weights))
    weights.unlink()
    assert train({**config, "resume_from_checkpoint": "latest"}).global_step == 4
    resumed = load_file(str(weights))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.allclose(straight[key], resumed[key], atol=1e-6), key
