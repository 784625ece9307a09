"""DeepFloyd IF on tiny random-weight models: pixel space (no VAE), T5 prompts, learned variance, stage II input."""

from __future__ import annotations

import pytest
import torch

from helpers.families import make_batch, make_family
from simpletuner.config.settings import Settings
from simpletuner.models.registry import get_family

FAMILIES = ("deepfloyd",)
CPU = torch.device("cpu")
RENDER = dict(num_inference_steps=2, height=32, width=32, output_type="pt", clean_caption=False)


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def stage_ii(tmp_path_factory):
    """The tiny stage II (super-resolution) model, loaded as model_flavour=ii-medium-450m."""
    from simpletuner.models.tiny.deepfloyd import build_stage_ii

    folder = tmp_path_factory.mktemp("deepfloyd-stage-ii")
    torch.manual_seed(0)
    build_stage_ii().save_pretrained(folder, safe_serialization=True)
    model = make_family({"deepfloyd": str(folder)}, "deepfloyd", model_flavour="ii-medium-450m")
    model.load(CPU, torch.float32)
    return model


def capture_unet_calls(unet) -> tuple[list, object]:
    """(list filled with (args, kwargs, output) per UNet call, the hook handle to remove)."""
    calls = []
    handle = unet.register_forward_hook(lambda module, args, kwargs, output: calls.append((args, kwargs, output[0])),
                                        with_kwargs=True)
    return calls, handle


def test_tiny_pipeline_loads_without_safety_modules_and_renders(model_dirs):
    from diffusers import IFPipeline

    pipeline = IFPipeline.from_pretrained(model_dirs["deepfloyd"])
    assert pipeline.safety_checker is None and pipeline.watermarker is None
    assert pipeline.config.requires_safety_checker is False
    images = pipeline("a red circle", generator=seeded(), **RENDER).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_load_gives_a_frozen_t5_a_pixel_unet_and_no_vae(loaded):
    model = loaded["deepfloyd"]
    components = model.components
    assert components.vae is None
    assert not any(p.requires_grad for p in components.text_encoders[0].parameters())
    unet = components.denoiser
    assert (unet.config.in_channels, unet.config.out_channels) == (3, 6)
    assert components.noise_scheduler.config.prediction_type == "epsilon"
    # Training fits the noise half only, so renders sample with the fixed variance.
    assert components.extras["inference_scheduler"].config.variance_type == "fixed_small"
    assert model.build_pipeline().scheduler.config.variance_type == "fixed_small"


def test_encode_text_is_what_the_pipeline_computes(loaded):
    model = loaded["deepfloyd"]
    text = model.encode_text(["A Red Circle ", ""])
    assert text["prompt_embeds"].shape == (2, 77, 32)
    pipeline = model.build_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    common = dict(RENDER, guidance_scale=1.0, **model.pipeline_call_arguments())
    from_prompt = pipeline("A Red Circle ", generator=seeded(), **common).images
    from_cache = pipeline(prompt_embeds=text["prompt_embeds"][:1], generator=seeded(), **common).images
    assert torch.equal(from_prompt, from_cache)


def test_the_latents_are_the_pixels(loaded):
    model = loaded["deepfloyd"]
    pixels = torch.rand(2, 3, 64, 48) * 2 - 1
    latents = model.encode_images(pixels)
    assert latents.dtype == torch.float32 and torch.equal(latents, pixels)
    assert torch.equal(model.decode_latents(latents), pixels)
    assert torch.equal(model.decode_latents(latents * 3), (pixels * 3).clamp(-1, 1))


def test_predict_is_the_noise_half_the_pipeline_steps_with(loaded):
    """Capture the UNet call inside a pipeline step and check predict returns its first three channels."""
    model = loaded["deepfloyd"]
    pipeline = model.build_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    calls, hook = capture_unet_calls(model.components.denoiser)
    try:
        pipeline("a red circle", generator=seeded(), guidance_scale=1.0, **dict(RENDER, num_inference_steps=1))
    finally:
        hook.remove()
    (sample, timestep), kwargs, output = calls[0]
    assert output.shape[1] == 6
    batch = make_batch(model, sample, ["a red circle"], sizes=(32, 32))
    predicted = model.predict(batch, sample, timestep.reshape(1))
    assert predicted.shape == sample.shape
    assert torch.allclose(predicted, output[:, :3], atol=1e-5)


@pytest.mark.parametrize("choice", ["ddim", "euler", "unipc", "dpm++"])
def test_validation_schedulers_sample_the_noise_half(loaded, choice):
    from simpletuner.validation.schedulers import validation_scheduler

    model = loaded["deepfloyd"]
    pipeline = model.build_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = validation_scheduler(choice, pipeline.scheduler, flow_matching=False)
    images = pipeline("a red circle", generator=seeded(), **RENDER).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_settings_that_cannot_apply_are_refused():
    family = get_family("deepfloyd")
    assert family.check_settings(Settings({"model_family": "deepfloyd", "model_flavour": "i-xlarge-4.3b"})) == []
    cases = {
        "prediction_type": ("v_prediction", "does not work"),
        "tokenizer_max_length": (256, "always encodes 77"),
        "pretrained_vae_model_name_or_path": ("some/vae", "has no VAE"),
        "vae_enable_tiling": (True, "has no VAE"),
        "train_text_encoder": (True, "T5 stays frozen"),
    }
    for option, (value, message) in cases.items():
        problems = family.check_settings(Settings({"model_family": "deepfloyd", option: value}))
        assert len(problems) == 1 and message in problems[0] and option in problems[0], (option, problems)
    stage_ii = {"model_family": "deepfloyd", "model_flavour": "ii-large-1.2b", "validation_using_datasets": True}
    assert family.check_settings(Settings(stage_ii)) == []
    for option in ("validation_prompt", "validation_prompt_library"):
        problems = family.check_settings(Settings({**stage_ii, option: "a red circle"}))
        assert len(problems) == 1 and "cannot render from a prompt alone" in problems[0] and option in problems[0]
    assert family.check_settings(Settings({**stage_ii, "validation_prompt": "x", "validation_disable": True})) == []
    problems = family.check_settings(Settings({"model_family": "deepfloyd", "aspect_bucket_alignment": 4}))
    assert len(problems) == 1 and "multiples of 8" in problems[0]


def test_a_stage_ii_unet_is_refused_at_load(model_dirs, tmp_path):
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(model_dirs["deepfloyd"], subfolder="unet")
    UNet2DConditionModel.from_config({**config, "in_channels": 6}).save_pretrained(tmp_path / "unet")
    model = make_family(model_dirs, "deepfloyd", pretrained_unet_model_name_or_path=str(tmp_path / "unet"))
    with pytest.raises(ValueError, match="stage I flavour, but the UNet .* reads 6 channels"):
        model.load(CPU, torch.float32)


def test_controlnet_is_refused_with_the_reason():
    from simpletuner.config.errors import ConfigError
    from simpletuner.models.controlnets import controlnet_kind

    with pytest.raises(ConfigError, match="no DeepFloyd IF ControlNet"):
        controlnet_kind("deepfloyd")


def test_stage_ii_predict_reads_the_noised_upscale_of_the_clean_image(stage_ii):
    from simpletuner.models.deepfloyd_stage2 import training_condition

    clean = torch.rand(2, 3, 64, 64) * 2 - 1
    noisy = torch.randn(2, 3, 64, 64)
    batch = make_batch(stage_ii, clean, ["a red circle", "blue stripes"], sizes=(64, 64))
    calls, hook = capture_unet_calls(stage_ii.components.denoiser)
    try:
        torch.manual_seed(3)
        predicted = stage_ii.predict(batch, noisy, torch.tensor([900, 20]))
    finally:
        hook.remove()
    (sample, _), kwargs, output = calls[0]
    torch.manual_seed(3)
    condition, levels = training_condition(clean, stage_ii.components.extras["image_noising_scheduler"])
    assert torch.equal(sample[:, :3], noisy) and torch.allclose(sample[:, 3:], condition)
    assert torch.equal(kwargs["class_labels"], levels)
    assert predicted.shape == noisy.shape and torch.equal(predicted, output[:, :3])


def test_stage_ii_condition_matches_what_the_pipeline_feeds_its_unet(stage_ii):
    """The validation pipeline shrinks the image 4x, then upscales and noises it exactly as training does."""
    from PIL import Image

    from simpletuner.models.deepfloyd_stage2 import noised_upscale, shrink

    pipeline = stage_ii.build_pipeline(img2img=True)
    pipeline.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (64, 48), (200, 30, 60))
    calls, hook = capture_unet_calls(stage_ii.components.denoiser)
    try:
        result = pipeline("a red circle", image=image, generator=seeded(), guidance_scale=1.0, noise_level=250,
                          **dict(RENDER, height=48, width=64, num_inference_steps=1)).images
    finally:
        hook.remove()
    assert result.shape == (1, 3, 48, 64)
    generator = seeded()
    torch.randn((1, 3, 48, 64), generator=generator)  # the pipeline draws its starting noise first
    noise = torch.randn((1, 3, 48, 64), generator=generator)
    pixels = torch.tensor(list(image.getdata()), dtype=torch.float32).reshape(1, 48, 64, 3).permute(0, 3, 1, 2)
    expected = noised_upscale(shrink(pixels / 127.5 - 1), (48, 64), pipeline.image_noising_scheduler,
                              torch.tensor([250]), noise)
    (sample, _), kwargs, _ = calls[0]
    assert torch.allclose(sample[:, 3:], expected, atol=1e-5)
    assert kwargs["class_labels"].tolist() == [250]


def test_delete_model_after_load_lists_no_vae_files():
    from simpletuner.training.model_file_cleanup import text_encoder_files, vae_files

    settings = Settings({"model_family": "deepfloyd", "delete_model_after_load": True, "validation_disable": True})
    family = get_family("deepfloyd")
    assert vae_files(family, settings) == []
    assert [part.subfolder for part in text_encoder_files(family, settings)] == ["text_encoder"]
