"""sd1x / sd2x / sdxl families on tiny random-weight models, loaded through the real from_pretrained path."""

import os

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from helpers.families import make_batch, make_family
from simpletuner.config.settings import Settings
from simpletuner.models.registry import get_family

FAMILIES = ("sd1x", "sd2x", "sdxl")
CPU = torch.device("cpu")
PROMPTS = ["a red circle on a blue background", "horizontal green stripes"]
# Text widths of the tiny models: (prompt_embeds last dim, pooled dim or None).
TEXT_WIDTHS = {"sd1x": (32, None), "sd2x": (48, None), "sdxl": (80, 48)}


@pytest.mark.parametrize("family", FAMILIES)
def test_load_returns_frozen_components(loaded, family):
    model = loaded[family]
    components = model.components
    assert components.denoiser.config.in_channels == 4
    assert not any(p.requires_grad for p in components.vae.parameters())
    for encoder in components.text_encoders:
        assert not any(p.requires_grad for p in encoder.parameters())
    assert components.vae.dtype == torch.float32
    assert len(components.tokenizers) == len(components.text_encoders) == len(model.text_encoder_attributes)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_text_matches_the_pipeline(loaded, family):
    model = loaded[family]
    text = model.encode_text(PROMPTS)
    width, pooled_width = TEXT_WIDTHS[family]
    assert text["prompt_embeds"].shape == (2, 77, width)
    pipeline = model.build_pipeline()
    if pooled_width:
        assert text["pooled_prompt_embeds"].shape == (2, pooled_width)
        embeds, _, pooled, _ = pipeline.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        torch.testing.assert_close(pooled, text["pooled_prompt_embeds"])
    else:
        assert set(text) == {"prompt_embeds"}
        embeds, _ = pipeline.encode_prompt(PROMPTS, CPU, 1, False)
    torch.testing.assert_close(embeds, text["prompt_embeds"])


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_images_is_8x_down_and_reproducible(loaded, family):
    model = loaded[family]
    pixels = torch.rand(2, 3, 64, 96) * 2 - 1
    latents = model.encode_images(pixels)
    assert latents.shape == (2, 4, 8, 12)
    torch.testing.assert_close(model.encode_images(pixels), latents)
    decoded = model.decode_latents(latents)
    assert decoded.shape == (2, 3, 64, 96)
    assert decoded.min() >= -1 and decoded.max() <= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_predict_shapes_and_gradients(loaded, family):
    model = loaded[family]
    unet = model.components.denoiser
    latents = torch.randn(2, 4, 8, 12)
    batch = make_batch(model, latents, PROMPTS)
    unet.requires_grad_(True)
    try:
        output = model.predict(batch, torch.randn_like(latents), torch.tensor([10, 900]))
        assert output.shape == latents.shape
        output.pow(2).mean().backward()
        assert unet.conv_in.weight.grad is not None and unet.conv_in.weight.grad.abs().sum() > 0
    finally:
        unet.zero_grad(set_to_none=True)
        unet.requires_grad_(False)


def test_sdxl_micro_conditioning_reaches_the_unet(loaded):
    model = loaded["sdxl"]
    latents = torch.randn(1, 4, 8, 8)
    batch = make_batch(model, latents, PROMPTS[:1], sizes=(64, 64))
    batch.crop_coords = [(16, 8)]
    assert model.time_ids(batch).tolist() == [[64.0, 64.0, 16.0, 8.0, 64.0, 64.0]]
    timesteps = torch.tensor([500])
    with torch.no_grad():
        first = model.predict(batch, latents, timesteps)
        batch.original_sizes = [(1024, 512)]
        second = model.predict(batch, latents, timesteps)
    assert not torch.allclose(first, second)


def test_sdxl_time_ids_need_one_entry_per_sample(loaded):
    model = loaded["sdxl"]
    batch = make_batch(model, torch.randn(2, 4, 8, 8), PROMPTS)
    batch.target_sizes = batch.target_sizes[:1]
    with pytest.raises(ValueError, match="one entry per sample"):
        model.time_ids(batch)


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_renders_64px_in_two_steps(loaded, family):
    model = loaded[family]
    pipeline = model.build_pipeline()
    assert type(pipeline) is model.pipeline_class
    generator = torch.Generator().manual_seed(0)
    image = pipeline(PROMPTS[0], num_inference_steps=2, height=64, width=64, generator=generator).images[0]
    assert image.size == (64, 64)
    assert type(model.build_pipeline(img2img=True)) is model.img2img_pipeline_class


def test_schedulers_follow_prediction_type_and_options(model_dirs, loaded):
    assert loaded["sd1x"].components.noise_scheduler.config.prediction_type == "epsilon"
    sd2 = loaded["sd2x"]
    assert sd2.prediction_type() == "v_prediction"
    assert sd2.components.noise_scheduler.config.prediction_type == "v_prediction"
    assert sd2.components.extras["inference_scheduler"].config.prediction_type == "v_prediction"
    assert type(sd2.components.extras["inference_scheduler"]).__name__ == "DDIMScheduler"
    assert make_family(model_dirs, "sd2x", model_flavour="2.1-base").prediction_type() == "epsilon"
    assert make_family(model_dirs, "sd2x", model_flavour="2.1", prediction_type="epsilon").prediction_type() == "epsilon"

    model = make_family(model_dirs, "sd1x", rescale_betas_zero_snr=True, training_scheduler_timestep_spacing="leading",
                        prediction_type="v_prediction")
    components = model.load(CPU, torch.float32)
    config = components.noise_scheduler.config
    assert type(components.noise_scheduler).__name__ == "DDPMScheduler"
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
        "v_prediction", True, "leading")
    assert components.noise_scheduler.alphas_cumprod[-1] < 1e-6  # zero terminal SNR
    assert components.extras["inference_scheduler"].config.prediction_type == "v_prediction"


def test_vae_dtype_and_separate_vae_and_unet_paths(model_dirs):
    folder = model_dirs["sd1x"]
    model = make_family(model_dirs, "sd1x", vae_dtype="bf16",
                        pretrained_vae_model_name_or_path=os.path.join(folder, "vae"),
                        pretrained_unet_model_name_or_path=folder)
    components = model.load(CPU, torch.float32)
    assert components.vae.dtype == torch.bfloat16
    assert components.denoiser.dtype == torch.float32
    assert make_family(model_dirs, "sd1x", vae_dtype="default").load(CPU, torch.float32).vae.dtype == torch.float32


def test_fingerprint_tracks_what_produces_cached_tensors(model_dirs):
    base = make_family(model_dirs, "sdxl").fingerprint()
    assert base == make_family(model_dirs, "sdxl").fingerprint()
    assert base.startswith("sdxl-")
    assert base != make_family(model_dirs, "sdxl", pretrained_vae_model_name_or_path="other/vae").fingerprint()
    assert base != make_family(model_dirs, "sdxl", revision="main").fingerprint()
    assert base != make_family(model_dirs, "sdxl", variant="fp16").fingerprint()


def test_check_settings_reports_problems():
    sd1 = get_family("sd1x")
    assert sd1.check_settings(Settings({"model_family": "sd1x"})) == []
    problems = sd1.check_settings(Settings({"model_family": "sd1x", "prediction_type": "flow_matching"}))
    assert len(problems) == 1 and "flow_matching" in problems[0]
    problems = get_family("sd2x").check_settings(Settings({"model_family": "sd2x", "model_flavour": "3.0"}))
    assert len(problems) == 1 and "'3.0'" in problems[0] and "2.1-base" in problems[0]
    sdxl = get_family("sdxl")
    assert any("fp16" in p for p in sdxl.check_settings(Settings({"model_family": "sdxl", "vae_dtype": "fp16"})))
    fixed_vae = Settings({"model_family": "sdxl", "vae_dtype": "fp16",
                          "pretrained_vae_model_name_or_path": "madebyollin/sdxl-vae-fp16-fix"})
    assert sdxl.check_settings(fixed_vae) == []


def test_using_a_family_before_load_says_so(model_dirs):
    with pytest.raises(RuntimeError, match="load"):
        make_family(model_dirs, "sd1x").encode_text(["x"])


# --------------------------------------------------------------------------- LoRA

def add_unet_lora(unet, rank, alpha, targets):
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    unet.add_adapter(config)
    return config


def add_text_lora(encoder, rank, alpha):
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    inject_adapter_in_model(config, encoder)
    return config


def randomise_lora_b(*modules):
    """PEFT starts lora_B at zero (a no-op adapter); make it non-zero so the effect is visible."""
    generator = torch.Generator().manual_seed(3)
    for module in modules:
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5


def unet_output(unet, text, latents, timesteps, sdxl):
    extra = {}
    if sdxl:
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        extra["added_cond_kwargs"] = {"text_embeds": text["pooled_prompt_embeds"], "time_ids": time_ids}
    with torch.no_grad():
        return unet(latents, timesteps, encoder_hidden_states=text["prompt_embeds"], **extra).sample


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_lora_loads_into_the_pipeline_and_matches(model_dirs, family, tmp_path):
    from diffusers import DiffusionPipeline

    model = make_family(model_dirs, family)
    components = model.load(CPU, torch.float32)
    unet_config = add_unet_lora(components.denoiser, rank=4, alpha=8, targets=model.default_lora_targets)
    text_configs = {attribute: add_text_lora(encoder, rank=2, alpha=4)
                    for attribute, encoder in zip(model.text_encoder_attributes, components.text_encoders)}
    randomise_lora_b(components.denoiser, *components.text_encoders)
    text_states = {attribute: get_peft_model_state_dict(encoder)
                   for attribute, encoder in zip(model.text_encoder_attributes, components.text_encoders)}
    metadata = {"unet": unet_config.to_dict(), **{name: c.to_dict() for name, c in text_configs.items()}}
    model.save_lora(str(tmp_path), get_peft_model_state_dict(components.denoiser), text_states,
                    adapter_metadata=metadata)
    assert os.path.isfile(tmp_path / "pytorch_lora_weights.safetensors")

    text = model.encode_text(PROMPTS[:1])  # through the trained (LoRA) text encoders
    latents, timesteps = torch.randn(1, 4, 8, 8), torch.tensor([500])
    trained = unet_output(components.denoiser, text, latents, timesteps, family == "sdxl")
    pipeline = DiffusionPipeline.from_pretrained(model_dirs[family])
    before = unet_output(pipeline.unet, text, latents, timesteps, family == "sdxl")
    pipeline.load_lora_weights(str(tmp_path))
    after = unet_output(pipeline.unet, text, latents, timesteps, family == "sdxl")
    assert not torch.allclose(before, trained, atol=1e-3)
    torch.testing.assert_close(after, trained, atol=1e-5, rtol=1e-4)

    if family == "sdxl":
        embeds, _, pooled, _ = pipeline.encode_prompt(PROMPTS[:1], do_classifier_free_guidance=False)
        torch.testing.assert_close(pooled, text["pooled_prompt_embeds"])
    else:
        embeds, _ = pipeline.encode_prompt(PROMPTS[:1], CPU, 1, False)
    torch.testing.assert_close(embeds, text["prompt_embeds"])


def test_lora_without_metadata_loads_when_alpha_equals_rank(model_dirs, tmp_path):
    from diffusers import DiffusionPipeline

    model = make_family(model_dirs, "sd1x")
    components = model.load(CPU, torch.float32)
    add_unet_lora(components.denoiser, rank=4, alpha=4, targets=model.default_lora_targets)
    randomise_lora_b(components.denoiser)
    model.save_lora(str(tmp_path), get_peft_model_state_dict(components.denoiser))
    text = model.encode_text(PROMPTS[:1])
    latents, timesteps = torch.randn(1, 4, 8, 8), torch.tensor([250])
    pipeline = DiffusionPipeline.from_pretrained(model_dirs["sd1x"])
    pipeline.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(unet_output(pipeline.unet, text, latents, timesteps, False),
                               unet_output(components.denoiser, text, latents, timesteps, False),
                               atol=1e-5, rtol=1e-4)


def test_save_lora_refuses_unknown_text_encoder(loaded, tmp_path):
    with pytest.raises(ValueError, match="text_encoder_2"):
        loaded["sd1x"].save_lora(str(tmp_path), {}, {"text_encoder_2": {}})
