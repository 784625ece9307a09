"""sd3 and auraflow families on tiny random-weight models, loaded through the real from_pretrained path."""

import pytest
import torch
from safetensors.torch import save_file

from helpers.families import make_batch, make_family
from helpers.original_layout import sd3_transformer_to_original, vae_to_original
from simpletuner.config.settings import Settings
from simpletuner.models.registry import get_family
from simpletuner.models.sd3 import StableDiffusion3

FAMILIES = ("sd3", "auraflow")
CPU = torch.device("cpu")
PROMPTS = ["a red circle on a blue background", "", "horizontal green stripes"]
LATENT_CHANNELS = {"sd3": 16, "auraflow": 4}


def sharing(loaded, model_dirs, family, **options):
    """A family with other options that reuses the loaded components (no second load)."""
    model = make_family(model_dirs, family, **options)
    model.components = loaded[family].components
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_load_returns_frozen_flow_components(loaded, family):
    model = loaded[family]
    components = model.components
    assert model.flow_matching and model.prediction_type() == "flow_matching"
    assert components.denoiser.config.in_channels == LATENT_CHANNELS[family]
    assert type(components.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    for part in [components.vae, *components.text_encoders]:
        assert not any(p.requires_grad for p in part.parameters())
    assert len(components.tokenizers) == len(components.text_encoders) == len(model.text_encoder_attributes)


def test_sd3_encode_text_matches_the_pipeline(loaded):
    model = loaded["sd3"]
    text = model.encode_text(PROMPTS)
    assert text["prompt_embeds"].shape == (3, 77 + 154, 96)  # CLIP's 77 + T5's default 154, at T5's width
    assert text["pooled_prompt_embeds"].shape == (3, 32 + 48)
    embeds, _, pooled, _ = model.build_pipeline().encode_prompt(
        PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False, **model.pipeline_call_arguments())
    torch.testing.assert_close(embeds, text["prompt_embeds"])
    torch.testing.assert_close(pooled, text["pooled_prompt_embeds"])


def test_auraflow_encode_text_matches_the_pipeline(loaded):
    model = loaded["auraflow"]
    text = model.encode_text(PROMPTS)
    assert text["prompt_embeds"].shape == (3, 128, 64)
    mask = text["prompt_attention_mask"]
    assert mask.shape == (3, 128) and mask[0].sum() > mask[1].sum() > 0  # "" still holds the end token
    assert text["prompt_embeds"][mask == 0].abs().sum() == 0
    embeds, *_ = model.build_pipeline().encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                                      **model.pipeline_call_arguments())
    torch.testing.assert_close(embeds, text["prompt_embeds"])


def test_sd3_uncond_behaviours_zero_only_empty_captions(loaded, model_dirs):
    encoded = loaded["sd3"].encode_text(PROMPTS)["prompt_embeds"]
    clip_zero = sharing(loaded, model_dirs, "sd3", sd3_clip_uncond_behaviour="zero").encode_text(PROMPTS)
    embeds, pooled = clip_zero["prompt_embeds"], clip_zero["pooled_prompt_embeds"]
    assert embeds[1].abs().sum() == 0 and pooled[1].abs().sum() == 0  # T5 follows CLIP when unset
    torch.testing.assert_close(embeds[[0, 2]], encoded[[0, 2]])
    split = sharing(loaded, model_dirs, "sd3", sd3_clip_uncond_behaviour="zero",
                    sd3_t5_uncond_behaviour="empty_string").encode_text(PROMPTS)["prompt_embeds"]
    assert split[1, :77].abs().sum() == 0
    torch.testing.assert_close(split[1, 77:], encoded[1, 77:])
    t5_only = sharing(loaded, model_dirs, "sd3", sd3_t5_uncond_behaviour="zero").encode_text(PROMPTS)
    assert t5_only["prompt_embeds"][1, 77:].abs().sum() == 0 and t5_only["pooled_prompt_embeds"][1].abs().sum() > 0


def test_sd3_t5_padding_and_length_options(loaded, model_dirs):
    default = loaded["sd3"]
    zeroed = sharing(loaded, model_dirs, "sd3", t5_padding="zero")
    t5_kept = default.encode_text(PROMPTS[:1])["prompt_embeds"][0, 77:]
    t5_zeroed = zeroed.encode_text(PROMPTS[:1])["prompt_embeds"][0, 77:]
    used = len(default.components.tokenizers[2](PROMPTS[0]).input_ids)
    assert t5_kept[used:].abs().sum() > 0 and t5_zeroed[used:].abs().sum() == 0
    torch.testing.assert_close(t5_zeroed[:used], t5_kept[:used])
    short = sharing(loaded, model_dirs, "sd3", tokenizer_max_length=77)
    assert short.encode_text(PROMPTS[:1])["prompt_embeds"].shape[1] == 77 + 77
    fingerprints = {default.fingerprint(), zeroed.fingerprint(), short.fingerprint(),
                    sharing(loaded, model_dirs, "sd3", sd3_clip_uncond_behaviour="zero").fingerprint()}
    assert len(fingerprints) == 4, "options that change text embeddings must change the cache fingerprint"


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_images_applies_shift_and_scale(loaded, family):
    model = loaded[family]
    pixels = torch.rand(2, 3, 64, 96) * 2 - 1
    latents = model.encode_images(pixels)
    assert latents.shape == (2, LATENT_CHANNELS[family], 8, 12)
    vae = model.components.vae
    mean = vae.encode(pixels).latent_dist.mean
    shift = vae.config.shift_factor or 0.0
    assert (shift != 0) == (family == "sd3")
    torch.testing.assert_close(latents, (mean - shift) * vae.config.scaling_factor)
    assert model.decode_latents(latents).shape == (2, 3, 64, 96)


@pytest.mark.parametrize("family", FAMILIES)
def test_predict_is_the_velocity_one_pipeline_step_uses(loaded, family):
    """A one-step pipeline run moves latents from sigma 1 to 0: out = x - v. predict at timestep 1000 must give v."""
    model = loaded[family]
    latents = torch.randn(1, LATENT_CHANNELS[family], 8, 8, generator=torch.Generator().manual_seed(1))
    batch = make_batch(model, latents, PROMPTS[:1])
    extra = ({"pooled_prompt_embeds": batch.text["pooled_prompt_embeds"]} if family == "sd3"
             else {"prompt_attention_mask": batch.text["prompt_attention_mask"]})
    with torch.no_grad():
        velocity = model.predict(batch, latents, torch.tensor([1000.0]))
        stepped = model.build_pipeline()(prompt_embeds=batch.text["prompt_embeds"], latents=latents.clone(),
                                         num_inference_steps=1, guidance_scale=1.0, output_type="latent",
                                         height=64, width=64, **extra).images
    torch.testing.assert_close(stepped, latents - velocity, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_predict_reaches_the_transformer_weights(loaded, family):
    model = loaded[family]
    transformer = model.components.denoiser
    latents = torch.randn(2, LATENT_CHANNELS[family], 8, 12)
    batch = make_batch(model, latents, PROMPTS[:2])
    transformer.requires_grad_(True)
    try:
        first = model.predict(batch, latents, torch.tensor([100.0, 900.0]))
        assert first.shape == latents.shape
        first.pow(2).mean().backward()
        assert transformer.proj_out.weight.grad.abs().sum() > 0
    finally:
        transformer.zero_grad(set_to_none=True)
        transformer.requires_grad_(False)
    with torch.no_grad():
        later = model.predict(batch, latents, torch.tensor([500.0, 900.0]))
    assert not torch.allclose(first[0], later[0]) and torch.allclose(first[1], later[1], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_renders_64px_in_two_steps(loaded, family):
    model = loaded[family]
    pipeline = model.build_pipeline()
    assert type(pipeline) is model.pipeline_class
    image = pipeline(PROMPTS[0], num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    if family == "sd3":
        assert type(model.build_pipeline(img2img=True)) is model.img2img_pipeline_class
    else:
        with pytest.raises(ValueError, match="no img2img"):
            model.build_pipeline(img2img=True)


def test_check_settings_names_the_option_and_fix():
    sd3, auraflow = get_family("sd3"), get_family("auraflow")
    assert sd3.check_settings(Settings({"model_family": "sd3"})) == []
    messages = " ".join(sd3.check_settings(Settings({
        "model_family": "sd3", "prediction_type": "epsilon", "model_flavour": "xl", "tokenizer_max_length": 600,
        "aspect_bucket_alignment": 8})))
    for fragment in ("prediction_type='epsilon'", "model_flavour='xl'", "tokenizer_max_length=600",
                     "aspect_bucket_alignment=8"):
        assert fragment in messages
    assert auraflow.check_settings(Settings({"model_family": "auraflow", "tokenizer_max_length": 128})) == []
    assert "tokenizer_max_length=200" in auraflow.check_settings(
        Settings({"model_family": "auraflow", "tokenizer_max_length": 200}))[0]
    assert auraflow.check_settings(Settings({"model_family": "auraflow", "model_flavour": "pony",
                                             "tokenizer_max_length": 768})) == []
    assert "t5_padding" in auraflow.check_settings(Settings({"model_family": "auraflow",
                                                             "t5_padding": "unmodified"}))[0]


def test_flavours_and_defaults():
    sd3, auraflow = get_family("sd3"), get_family("auraflow")
    assert sd3.model_path(Settings({"model_flavour": "large"})) == "stabilityai/stable-diffusion-3.5-large"
    assert auraflow.model_path(Settings({})) == "terminusresearch/auraflow-v0.3"
    assert auraflow(Settings({"model_flavour": "pony"})).t5_length() == 768
    assert {"add_q_proj", "to_add_out"} <= set(auraflow.default_lora_targets)
    assert sd3.denoiser_subfolder == auraflow.denoiser_subfolder == "transformer"


def test_auraflow_takes_t5_from_pretrained_t5_model_name_or_path(loaded, model_dirs, tmp_path):
    from simpletuner.models.tiny.auraflow import umt5_encoder

    tokenizer = loaded["auraflow"].components.tokenizers[0]
    torch.manual_seed(5)
    replacement = umt5_encoder(tokenizer, 64)
    replacement.save_pretrained(tmp_path / "t5")  # a plain T5 folder: config.json at the top
    tokenizer.save_pretrained(tmp_path / "t5")
    model = make_family(model_dirs, "auraflow", pretrained_t5_model_name_or_path=str(tmp_path / "t5"))
    model.load(CPU, torch.float32)
    expected = replacement.state_dict()
    for key, value in model.components.text_encoders[0].state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    assert model.fingerprint() != loaded["auraflow"].fingerprint()


def test_transformer_from_pretrained_transformer_model_name_or_path(loaded, model_dirs, tmp_path):
    from simpletuner.models.tiny.auraflow import _auraflow_transformer

    torch.manual_seed(9)
    replacement = _auraflow_transformer(joint_attention_dim=64)
    replacement.save_pretrained(tmp_path / "flat")  # weights at the top level, no transformer/ folder
    model = make_family(model_dirs, "auraflow", pretrained_transformer_model_name_or_path=str(tmp_path / "flat"))
    transformer = model._load_transformer(model_dirs["auraflow"], torch.float32)
    torch.testing.assert_close(transformer.proj_out.weight, replacement.proj_out.weight)
    assert model.fingerprint() == loaded["auraflow"].fingerprint()  # the denoiser does not change cached inputs


# --- SD3 from one original-layout .safetensors file -------------------------------------------------
@pytest.fixture(scope="module")
def sd3_single_file(model_dirs, tmp_path_factory):
    """The tiny SD3 as one original-layout file: transformer, VAE and T5 (the CLIPs stay in the folder)."""
    from diffusers import StableDiffusion3Pipeline

    reference = StableDiffusion3Pipeline.from_pretrained(model_dirs["sd3"])
    transformer, vae = reference.transformer, reference.vae
    state = sd3_transformer_to_original(transformer.state_dict(), transformer.config.num_layers)
    state.update(vae_to_original(vae.state_dict(), len(vae.config.up_block_types)))
    state.update({f"text_encoders.t5xxl.transformer.{key}": value
                  for key, value in reference.text_encoder_3.state_dict().items()})
    path = tmp_path_factory.mktemp("single") / "tiny-sd3.safetensors"
    save_file({key: value.clone().contiguous() for key, value in state.items()}, str(path))
    return str(path), reference


def test_sd3_single_file_loads_the_same_weights(sd3_single_file, model_dirs, monkeypatch):
    path, reference = sd3_single_file
    monkeypatch.setitem(StableDiffusion3.flavours, "medium", model_dirs["sd3"])  # the architecture source
    family = StableDiffusion3(Settings({"model_family": "sd3", "pretrained_model_name_or_path": path,
                                        "vae_dtype": "fp32"}))
    components = family.load(CPU, torch.bfloat16)
    assert components.vae.dtype == torch.float32 and components.denoiser.dtype == torch.bfloat16
    pairs = [(components.denoiser, reference.transformer), (components.vae, reference.vae),
             (components.text_encoders[0], reference.text_encoder),
             (components.text_encoders[2], reference.text_encoder_3)]
    for loaded_part, original in pairs:
        expected = original.state_dict()
        for key, value in loaded_part.state_dict().items():
            torch.testing.assert_close(value, expected[key].to(value.dtype), msg=key)
    assert family.encode_images(torch.zeros(1, 3, 64, 64)).shape == (1, 16, 8, 8)


def test_sd3_single_file_must_be_safetensors_and_exist(tmp_path):
    for name, error in (("model.ckpt", ValueError), ("missing.safetensors", FileNotFoundError)):
        family = StableDiffusion3(Settings({"model_family": "sd3",
                                            "pretrained_model_name_or_path": str(tmp_path / name)}))
        with pytest.raises(error, match=name):
            family.load(CPU, torch.float32)
