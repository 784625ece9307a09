"""The flux family on the tiny Flux pipeline: loading, encoders, packing, guidance, masks, LoRA presets."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from simpletuner.config.settings import Settings
from simpletuner.data.types import TrainingBatch
from simpletuner.models.flux import Flux, latent_image_ids, pack_latents, unpack_latents
from simpletuner.models.flux_lora_targets import CONTROLNET_FLUX_LORA_TARGETS, FLUX_LORA_TARGETS, flux_lora_targets

CPU = torch.device("cpu")
SHORT_T5 = 24  # tokenizer_max_length used where the exact length does not matter (faster)


@pytest.fixture(scope="module")
def tiny_flux(tiny_model):
    return tiny_model("flux")


@pytest.fixture(scope="module")
def family(tiny_flux):
    loaded = Flux(Settings({"model_family": "flux", "pretrained_model_name_or_path": tiny_flux}))
    loaded.load(CPU, torch.float32)
    return loaded


def with_settings(family: Flux, **values) -> Flux:
    """A second family object sharing the loaded components, with other settings."""
    other = Flux(Settings({"model_family": "flux", "pretrained_model_name_or_path": "unused", **values}))
    other.components = family.components
    other.has_guidance_input = family.has_guidance_input
    other.num_train_timesteps = family.num_train_timesteps
    return other


def make_batch(family: Flux, prompts: list[str], size: int = 8) -> TrainingBatch:
    count = len(prompts)
    generator = torch.Generator().manual_seed(1)
    return TrainingBatch(latents=torch.randn(count, 16, size, size, generator=generator),
                         text=family.encode_text(prompts), original_sizes=[(64, 64)] * count,
                         crop_coords=[(0, 0)] * count, target_sizes=[(64, 64)] * count,
                         sample_ids=[str(i) for i in range(count)])


# --- the tiny builder ---------------------------------------------------------------------
def test_tiny_flux_layout(tiny_flux):
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert os.path.isdir(os.path.join(tiny_flux, part)), part
    with open(os.path.join(tiny_flux, "vae", "config.json")) as handle:
        vae = json.load(handle)
    assert vae["latent_channels"] == 16 and len(vae["down_block_types"]) == 4  # 8x downsampling
    with open(os.path.join(tiny_flux, "scheduler", "scheduler_config.json")) as handle:
        assert json.load(handle)["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    with open(os.path.join(tiny_flux, "model_index.json")) as handle:
        assert json.load(handle)["_class_name"] == "FluxPipeline"


def test_tiny_flux_renders(tiny_flux):
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(tiny_flux)
    assert pipeline.tokenizer_2.convert_ids_to_tokens(pipeline.tokenizer_2("a red circle").input_ids) == [
        "\u2581a", "\u2581red", "\u2581circle", "</s>"]
    image = pipeline("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                     max_sequence_length=SHORT_T5, generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


# --- facts and settings -------------------------------------------------------------------
def test_family_facts():
    assert Flux.default_prediction_type == "flow_matching" and Flux.flow_matching
    assert Flux.denoiser_subfolder == "transformer"
    assert Flux.pipeline_class.__name__ == "FluxPipeline"
    assert Flux.img2img_pipeline_class.__name__ == "FluxImg2ImgPipeline"
    assert Flux.model_path(Settings({"model_flavour": "schnell"})) == "black-forest-labs/FLUX.1-schnell"
    assert Flux.model_path(Settings({})) == "black-forest-labs/FLUX.1-Krea-dev"


@pytest.mark.parametrize("values, expected", [
    ({}, 512), ({"model_flavour": "dev"}, 512), ({"model_flavour": "schnell"}, 256),
    ({"model_flavour": "schnell", "tokenizer_max_length": 77}, 77),
])
def test_t5_length_per_flavour(values, expected):
    assert Flux(Settings(values)).t5_max_length() == expected


@pytest.mark.parametrize("values, fragment", [
    ({"prediction_type": "epsilon"}, "prediction_type='epsilon'"),
    ({"model_flavour": "kontext"}, "model_flavour=kontext is not implemented yet"),
    ({"model_flavour": "flux3"}, "not a flux flavour"),
    ({"model_flavour": "libreflux"}, "flux_attention_masked_training=true"),
    ({"flux_guidance_mode": "random-range", "flux_guidance_min": 5.0, "flux_guidance_max": 2.0},
     "flux_guidance_min=5.0"),
    ({"flux_guidance_value": -1.0}, "flux_guidance_value=-1.0"),
    ({"tokenizer_max_length": 600}, "tokenizer_max_length=600"),
    ({"aspect_bucket_alignment": 8}, "aspect_bucket_alignment=8"),
])
def test_check_settings_refuses(values, fragment):
    problems = Flux.check_settings(Settings(values))
    assert any(fragment in problem for problem in problems), problems


def test_check_settings_accepts_a_normal_config():
    assert Flux.check_settings(Settings({"model_flavour": "dev", "prediction_type": "flow_matching",
                                         "flux_guidance_mode": "random-range"})) == []
    assert Flux.check_settings(Settings({"model_flavour": "libreflux",
                                         "flux_attention_masked_training": True})) == []


def test_fingerprint_follows_text_settings():
    base = {"pretrained_model_name_or_path": "/models/flux"}
    reference = Flux(Settings(base)).fingerprint()
    assert Flux(Settings({**base, "t5_padding": "zero"})).fingerprint() != reference
    assert Flux(Settings({**base, "tokenizer_max_length": 128})).fingerprint() != reference
    assert Flux(Settings({**base, "pretrained_t5_model_name_or_path": "/t5"})).fingerprint() != reference
    # The mask is always cached, so switching masked training needs no new text embeds.
    assert Flux(Settings({**base, "flux_attention_masked_training": True})).fingerprint() == reference


# --- encoders -----------------------------------------------------------------------------
def test_encode_text_shapes_and_mask(family):
    text = family.encode_text(["a red circle", ""])
    assert text["prompt_embeds"].shape == (2, 512, 32)
    assert text["pooled_prompt_embeds"].shape == (2, 32)
    assert text["prompt_attention_mask"].sum(dim=1).tolist() == [4, 1]  # three words + </s>; "" is just </s>
    assert text["prompt_embeds"][0, 4:].abs().sum() > 0  # unmodified padding keeps T5's output


def test_t5_padding_zero_clears_padded_positions(family):
    zeroed = with_settings(family, t5_padding="zero", tokenizer_max_length=SHORT_T5).encode_text(["a red circle"])
    kept = with_settings(family, tokenizer_max_length=SHORT_T5).encode_text(["a red circle"])
    assert zeroed["prompt_embeds"].shape == (1, SHORT_T5, 32)
    assert zeroed["prompt_embeds"][0, 4:].abs().sum() == 0
    torch.testing.assert_close(zeroed["prompt_embeds"][0, :4], kept["prompt_embeds"][0, :4])


def test_encode_images_applies_shift_and_scale(family):
    vae = family.components.vae
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = family.encode_images(pixels)
    assert latents.shape == (1, 16, 8, 8)
    with torch.no_grad():
        mean = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
    expected = (mean - vae.config.shift_factor) * vae.config.scaling_factor
    torch.testing.assert_close(latents, expected)
    assert family.decode_latents(latents).shape == (1, 3, 64, 64)


# --- packing and prediction ---------------------------------------------------------------
def test_packing_matches_the_pipeline():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 10)
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    torch.testing.assert_close(unpack_latents(packed, 6, 10), latents)
    torch.testing.assert_close(latent_image_ids(3, 5, CPU, torch.float32),
                               FluxPipeline._prepare_latent_image_ids(2, 3, 5, CPU, torch.float32))


def test_predict_calls_the_transformer_like_the_pipeline(family):
    batch = make_batch(with_settings(family, tokenizer_max_length=SHORT_T5), ["a red circle", "a blue square"])
    noisy = torch.randn(2, 16, 8, 8)
    timesteps = torch.tensor([250.0, 900.0])
    with torch.no_grad():
        prediction = family.predict(batch, noisy, timesteps)
        tokens = family.components.denoiser(
            hidden_states=pack_latents(noisy), encoder_hidden_states=batch.text["prompt_embeds"],
            pooled_projections=batch.text["pooled_prompt_embeds"], timestep=timesteps / 1000,
            guidance=torch.ones(2), img_ids=latent_image_ids(4, 4, CPU, torch.float32),
            txt_ids=torch.zeros(SHORT_T5, 3), return_dict=False)[0]
    assert prediction.shape == noisy.shape
    torch.testing.assert_close(prediction, unpack_latents(tokens, 8, 8))


def test_predict_refuses_odd_latent_grids(family):
    batch = make_batch(with_settings(family, tokenizer_max_length=SHORT_T5), ["a red circle"], size=9)
    with pytest.raises(ValueError, match="9x9 latent grid"):
        family.predict(batch, batch.latents, torch.tensor([500.0]))


def test_guidance_constant_and_random_range(family):
    timesteps = torch.tensor([100.0, 700.0, 300.0])
    constant = with_settings(family, flux_guidance_value=3.5).guidance_vector(3, timesteps)
    assert constant.tolist() == [3.5, 3.5, 3.5]
    ranged = with_settings(family, flux_guidance_mode="random-range", flux_guidance_min=2.0, flux_guidance_max=4.0)
    drawn = ranged.guidance_vector(3, timesteps)
    assert ((drawn >= 2.0) & (drawn <= 4.0)).all() and len(set(drawn.tolist())) == 3
    torch.testing.assert_close(ranged.guidance_vector(3, timesteps), drawn)  # repeatable for the same step
    assert not torch.equal(ranged.guidance_vector(3, timesteps + 1), drawn)
    no_guidance = with_settings(family)
    no_guidance.has_guidance_input = False
    assert no_guidance.guidance_vector(3, timesteps) is None


def test_guidance_value_reaches_the_transformer(family):
    batch = make_batch(with_settings(family, tokenizer_max_length=SHORT_T5), ["a red circle"])
    noisy, timesteps = torch.randn(1, 16, 8, 8), torch.tensor([500.0])
    with torch.no_grad():
        low = with_settings(family, flux_guidance_value=1.0).predict(batch, noisy, timesteps)
        high = with_settings(family, flux_guidance_value=4.0).predict(batch, noisy, timesteps)
    assert not torch.allclose(low, high)


def test_masked_attention_ignores_padded_text(family):
    short = with_settings(family, tokenizer_max_length=SHORT_T5)
    batch = make_batch(short, ["a red circle"])
    altered = make_batch(short, ["a red circle"])
    altered.text["prompt_embeds"][:, 4:] += 5.0  # change only the padded positions
    noisy, timesteps = torch.randn(1, 16, 8, 8), torch.tensor([500.0])
    masked = with_settings(family, tokenizer_max_length=SHORT_T5, flux_attention_masked_training=True)
    with torch.no_grad():
        torch.testing.assert_close(masked.predict(batch, noisy, timesteps), masked.predict(altered, noisy, timesteps))
        assert not torch.allclose(short.predict(batch, noisy, timesteps), short.predict(altered, noisy, timesteps))
    del batch.text["prompt_attention_mask"]
    with pytest.raises(ValueError, match="T5 attention mask"):
        masked.predict(batch, noisy, timesteps)


# --- LoRA presets -------------------------------------------------------------------------
def test_lora_presets_resolve_from_settings():
    assert Flux(Settings({})).lora_target_modules() == flux_lora_targets("all")
    assert "proj_mlp" in Flux(Settings({"flux_lora_target": "all+ffs"})).lora_target_modules()
    assert Flux(Settings({"flux_lora_target": "nano"})).lora_target_modules() == [
        "single_transformer_blocks.7.proj_out"]
    for choice in CONTROLNET_FLUX_LORA_TARGETS:
        with pytest.raises(ValueError, match="controlnet=true"):
            flux_lora_targets(choice)


def test_option_table_offers_every_preset_including_the_controlnet_ones():
    from simpletuner.config.options import OPTIONS

    option = OPTIONS["flux_lora_target"]
    assert not option.planned_choices
    assert set(option.choices) == set(FLUX_LORA_TARGETS) | set(CONTROLNET_FLUX_LORA_TARGETS)


BUILT_ON_TINY = [choice for choice in FLUX_LORA_TARGETS if choice not in ("tiny", "nano")]  # need >= 8 blocks


@pytest.mark.parametrize("choice", BUILT_ON_TINY)
def test_every_lora_preset_saves_and_loads_into_the_pipeline(choice, family, tiny_flux, tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from simpletuner.training import adapters

    settings = Settings({"model_family": "flux", "flux_lora_target": choice, "lora_rank": 2})
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    adapters.attach_lora(transformer, settings, Flux(settings).lora_target_modules())
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    state = adapters.lora_state_dict(transformer)
    wrapped = {key.split(".lora_")[0] for key in state}
    metadata = {"transformer": transformer.peft_config["default"].to_dict()}
    family.save_lora(str(tmp_path), state, adapter_metadata=metadata)
    pipeline = FluxPipeline.from_pretrained(tiny_flux)
    pipeline.load_lora_weights(str(tmp_path))
    loaded = {name for name, module in pipeline.transformer.named_modules() if hasattr(module, "lora_A")}
    assert wrapped and loaded == wrapped


def test_save_lora_refuses_text_encoder_adapters(family, tmp_path):
    with pytest.raises(ValueError, match="only the transformer"):
        family.save_lora(str(tmp_path), {}, text_encoder_lora_states={"text_encoder": {"x": torch.zeros(1)}})


# --- other weight sources -----------------------------------------------------------------
def test_single_file_transformer(tiny_flux, tmp_path, monkeypatch):
    from diffusers import FluxTransformer2DModel

    reference = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    path = str(tmp_path / "my-flux-finetune.safetensors")
    save_file({key: value.contiguous() for key, value in reference.state_dict().items()}, path)
    monkeypatch.setitem(Flux.flavours, "dev", tiny_flux)  # the architecture and the other parts
    loaded = Flux(Settings({"model_family": "flux", "model_flavour": "dev", "pretrained_model_name_or_path": path}))
    components = loaded.load(CPU, torch.bfloat16)
    assert components.denoiser.dtype == torch.bfloat16
    expected = reference.state_dict()
    for key, value in components.denoiser.state_dict().items():
        torch.testing.assert_close(value, expected[key].to(torch.bfloat16), msg=key)
    assert loaded.config_source() == tiny_flux
    assert components.text_encoders[1].__class__.__name__ == "T5EncoderModel"


def test_missing_single_file_is_reported(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    family = Flux(Settings({"model_family": "flux", "pretrained_model_name_or_path": missing}))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        family._load_transformer("black-forest-labs/FLUX.1-Krea-dev", torch.float32)


@pytest.mark.parametrize("inside, subfolder", [("", "transformer"), ("transformer", "none")])
def test_transformer_from_another_location(tiny_flux, inside, subfolder):
    from diffusers import FluxTransformer2DModel

    custom = os.path.join(tiny_flux, inside) if inside else tiny_flux
    family = Flux(Settings({"pretrained_model_name_or_path": "black-forest-labs/FLUX.1-dev",
                            "pretrained_transformer_model_name_or_path": custom,
                            "pretrained_transformer_subfolder": subfolder}))
    transformer = family._load_transformer("unused", torch.float32)
    assert isinstance(transformer, FluxTransformer2DModel) and transformer.config.num_layers == 1


def test_pretrained_t5_replaces_only_the_t5_weights(tiny_flux, tmp_path, family):
    from transformers import T5EncoderModel

    torch.manual_seed(3)
    other_t5 = T5EncoderModel(T5EncoderModel.from_pretrained(tiny_flux, subfolder="text_encoder_2").config)
    other_t5.save_pretrained(str(tmp_path / "t5"))  # a folder holding the model itself
    swapped = Flux(Settings({"model_family": "flux", "pretrained_model_name_or_path": tiny_flux,
                             "pretrained_t5_model_name_or_path": str(tmp_path / "t5"),
                             "tokenizer_max_length": SHORT_T5}))
    swapped.load(CPU, torch.float32)
    mine, theirs = swapped.encode_text(["a red circle"]), with_settings(family, tokenizer_max_length=SHORT_T5)
    theirs = theirs.encode_text(["a red circle"])
    torch.testing.assert_close(mine["pooled_prompt_embeds"], theirs["pooled_prompt_embeds"])
    assert not torch.allclose(mine["prompt_embeds"], theirs["prompt_embeds"])
    # A Flux-layout folder works too: T5 is read from its text_encoder_2/.
    same = Flux(Settings({"pretrained_model_name_or_path": tiny_flux, "pretrained_t5_model_name_or_path": tiny_flux}))
    assert same._load_text_encoders(tiny_flux, torch.float32)[1][1].config.d_model == 32


# --- flow schedule options reach the transformer -------------------------------------------
def _timesteps_seen(family: Flux, batch: TrainingBatch, **values) -> torch.Tensor:
    from simpletuner.training.loss_step import LossStep

    settings = Settings({"model_family": "flux", **values})
    step_family = with_settings(family, **values)
    seen = []
    original = step_family.predict

    def recording_predict(batch, noisy, timesteps):
        seen.append(timesteps.clone())
        return original(batch, noisy, timesteps)

    step_family.predict = recording_predict
    LossStep(step_family, settings, torch.float32)(batch, 0, torch.Generator().manual_seed(0))
    return seen[0]


def test_flow_schedule_options_take_effect(family):
    from simpletuner.training import noise

    batch = make_batch(with_settings(family, tokenizer_max_length=SHORT_T5), ["a"] * 4)
    short = {"tokenizer_max_length": SHORT_T5}
    fast = _timesteps_seen(family, batch, flux_fast_schedule=True, **short)
    assert {round(value) for value in fast.tolist()} <= {1000, 750, 500, 250}
    plain = _timesteps_seen(family, batch, flow_schedule_shift=1.0, **short) / 1000
    shifted = _timesteps_seen(family, batch, flow_schedule_shift=3.0, **short) / 1000
    torch.testing.assert_close(shifted, noise.shift_sigmas(plain, 3.0))
    auto = _timesteps_seen(family, batch, flow_schedule_auto_shift=True, **short) / 1000
    torch.testing.assert_close(auto, noise.shift_sigmas(plain, noise.AutoShift().shift_for(16)))
    uniform = _timesteps_seen(family, batch, flow_use_uniform_schedule=True, flow_schedule_shift=1.0, **short)
    assert not torch.allclose(uniform, plain * 1000)
