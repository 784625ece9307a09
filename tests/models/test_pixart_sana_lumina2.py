"""pixart_sigma / sana / lumina2 families on tiny random-weight models, loaded through from_pretrained."""

import shutil

import pytest
import torch

from simpletuner.config.loader import EXAMPLES_DIR
from helpers.families import make_batch, make_family
from simpletuner.config.settings import Settings
from simpletuner.config.validate import validate_settings

FAMILIES = ("pixart_sigma", "sana", "lumina2")
CPU = torch.device("cpu")
PROMPTS = ["a red circle on a blue background", "horizontal green stripes"]
# Latent (channels, side) for a 64px image: 8x VAEs give 8x8, Sana's 32x DC-AE gives 2x2.
LATENT_SHAPES = {"pixart_sigma": (4, 8), "sana": (32, 2), "lumina2": (16, 8)}
PROMPT_LENGTHS = {"pixart_sigma": 300, "sana": 300, "lumina2": 256}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_loads_and_renders(model_dirs, family):
    model = make_family(model_dirs, family)
    pipeline = model.pipeline_class.from_pretrained(model_dirs[family])
    images = pipeline("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                      generator=torch.Generator().manual_seed(0), **model.pipeline_call_arguments()).images
    assert images.shape == (1, 3, 64, 64)
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_text_embeds_carry_an_attention_mask(loaded, family):
    model = loaded[family]
    text = model.encode_text(PROMPTS + [""])
    length = PROMPT_LENGTHS[family]
    assert text["prompt_embeds"].shape[:2] == (3, length)
    assert text["prompt_attention_mask"].shape == (3, length)
    used = text["prompt_attention_mask"].sum(dim=1)
    assert (used > 0).all() and (used < length).all(), "short prompts must leave padded positions masked"


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_max_length_sets_the_prompt_length(model_dirs, family):
    model = make_family(model_dirs, family, tokenizer_max_length=24)
    model.load(CPU, torch.float32)
    text = model.encode_text(PROMPTS)
    assert text["prompt_embeds"].shape[1] == 24
    assert model.pipeline_call_arguments()["max_sequence_length"] == 24
    assert model.fingerprint() != make_family(model_dirs, family).fingerprint()


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_embeds_reproduce_the_pipelines_own_render(loaded, family):
    """Training sees exactly what inference computes from the prompt text."""
    model = loaded[family]
    pipeline = model.build_pipeline()
    text = model.encode_text(["a red circle"])
    common = dict(num_inference_steps=2, height=64, width=64, output_type="pt", guidance_scale=1.0,
                  **model.pipeline_call_arguments())
    from_prompt = pipeline("a red circle", generator=torch.Generator().manual_seed(0), **common).images
    from_cache = pipeline(prompt_embeds=text["prompt_embeds"], prompt_attention_mask=text["prompt_attention_mask"],
                          generator=torch.Generator().manual_seed(0), **common).images
    assert torch.equal(from_prompt, from_cache)


@pytest.mark.parametrize("family", FAMILIES)
def test_latents_round_trip_and_prediction_shape(loaded, family):
    model = loaded[family]
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    latents = model.encode_images(pixels)
    channels, side = LATENT_SHAPES[family]
    assert latents.shape == (2, channels, side, side)
    assert model.decode_latents(latents).shape == (2, 3, 64, 64)
    timesteps = torch.tensor([500.0, 20.0]) if model.flow_matching else torch.tensor([500, 20])
    prediction = model.predict(make_batch(model, latents, PROMPTS, sizes=(64, 64)), latents, timesteps)
    assert prediction.shape == latents.shape


def test_pixart_drops_the_learned_variance_half(loaded):
    model = loaded["pixart_sigma"]
    latents = torch.randn(2, 4, 8, 8)
    batch = make_batch(model, latents, PROMPTS, sizes=(64, 64))
    timesteps = torch.tensor([900, 10])
    full = model.components.denoiser(latents, encoder_hidden_states=batch.text["prompt_embeds"],
                                     encoder_attention_mask=batch.text["prompt_attention_mask"], timestep=timesteps,
                                     added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                     return_dict=False)[0]
    assert full.shape[1] == 8
    assert torch.equal(model.predict(batch, latents, timesteps), full[:, :4])


def test_lumina2_gets_reversed_time_and_its_output_negated(loaded):
    """Lumina 2's transformer takes t = 1 - sigma and predicts latents - noise; predict returns noise - latents."""
    model = loaded["lumina2"]
    latents = torch.randn(2, 16, 8, 8)
    batch = make_batch(model, latents, PROMPTS, sizes=(64, 64))
    sigmas = torch.tensor([0.9, 0.2])
    raw = model.components.denoiser(hidden_states=latents, timestep=1 - sigmas,
                                    encoder_hidden_states=batch.text["prompt_embeds"],
                                    encoder_attention_mask=batch.text["prompt_attention_mask"], return_dict=False)[0]
    assert torch.allclose(model.predict(batch, latents, sigmas * 1000), -raw, atol=1e-6)


def test_sana_passes_trainer_timesteps_unchanged(loaded):
    model = loaded["sana"]
    latents = torch.randn(2, 32, 2, 2)
    batch = make_batch(model, latents, PROMPTS, sizes=(64, 64))
    timesteps = torch.tensor([900.0, 200.0])
    raw = model.components.denoiser(latents, encoder_hidden_states=batch.text["prompt_embeds"],
                                    encoder_attention_mask=batch.text["prompt_attention_mask"], timestep=timesteps,
                                    return_dict=False)[0]
    assert torch.allclose(model.predict(batch, latents, timesteps), raw, atol=1e-6)


def test_sana_prepends_the_complex_human_instruction(model_dirs, loaded):
    from simpletuner.models.sana import default_complex_human_instruction

    default = loaded["sana"]
    assert default.pipeline_call_arguments()["complex_human_instruction"] == default_complex_human_instruction()
    custom = make_family(model_dirs, "sana", sana_complex_human_instruction='["Describe the image:", "Prompt: "]')
    assert custom.complex_human_instruction() == ["Describe the image:", "Prompt: "]
    none = make_family(model_dirs, "sana", sana_complex_human_instruction="")
    assert none.complex_human_instruction() == []
    assert len({default.fingerprint(), custom.fingerprint(), none.fingerprint()}) == 3
    none.load(CPU, torch.float32)
    with_instruction = default.encode_text(["a red circle"])["prompt_embeds"]
    without = none.encode_text(["a red circle"])["prompt_embeds"]
    assert not torch.allclose(with_instruction, without)


def _tokenizer_and_encoder_copy(model_dir, folder, layout: str):
    """A copy of the tiny model's text encoder with changed weights, in a plain or a diffusers-style folder."""
    from transformers import AutoTokenizer, Gemma2Model, T5EncoderModel

    encoder_class = T5EncoderModel if layout == "plain-t5" else Gemma2Model
    encoder = encoder_class.from_pretrained(model_dir, subfolder="text_encoder")
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(0.5)
    diffusers_layout = layout == "diffusers"
    target = folder / "text_encoder" if diffusers_layout else folder
    encoder.save_pretrained(target)
    AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer").save_pretrained(
        folder / "tokenizer" if diffusers_layout else folder)
    return encoder


@pytest.mark.parametrize("family,option,layout", [
    ("sana", "pretrained_gemma_model_name_or_path", "plain"),
    ("lumina2", "pretrained_gemma_model_name_or_path", "diffusers"),
    ("pixart_sigma", "pretrained_t5_model_name_or_path", "plain-t5"),
])
def test_text_encoder_comes_from_its_own_location(model_dirs, tmp_path, family, option, layout):
    expected = _tokenizer_and_encoder_copy(model_dirs[family], tmp_path, layout)
    model = make_family(model_dirs, family, **{option: str(tmp_path)})
    model.load(CPU, torch.float32)
    loaded_state = model.components.text_encoders[0].state_dict()
    assert all(torch.equal(loaded_state[k], v) for k, v in expected.state_dict().items())
    assert model.fingerprint() != make_family(model_dirs, family).fingerprint()


def test_transformer_comes_from_its_own_location(model_dirs, tmp_path):
    shutil.copytree(f"{model_dirs['lumina2']}/transformer", tmp_path / "weights")
    model = make_family(model_dirs, "lumina2", pretrained_transformer_model_name_or_path=str(tmp_path / "weights"),
                        pretrained_transformer_subfolder="none")
    model.load(CPU, torch.float32)
    assert model.components.denoiser.config.in_channels == 16


def _problems(**values):
    base = {"model_type": "full", "optimizer": "adamw_bf16", "data_backend_config": "d.json", "output_dir": "o",
            "max_train_steps": 1}
    return [str(error) for error in validate_settings(Settings({**base, **values}))]


def test_pixart_refuses_peft_lora_and_names_lycoris():
    problems = _problems(model_family="pixart_sigma", model_type="lora", lora_type="standard")
    assert any("lora_type=lycoris" in problem for problem in problems), problems
    lycoris_config = str(EXAMPLES_DIR / "pixart.lycoris-lokr" / "lycoris_config.json")
    assert not _problems(model_family="pixart_sigma", model_type="lora", lora_type="lycoris",
                         lycoris_config=lycoris_config)
    assert not _problems(model_family="pixart_sigma")


@pytest.mark.parametrize("values,fragment", [
    ({"model_family": "sana", "aspect_bucket_alignment": 16}, "multiples of 32"),
    ({"model_family": "lumina2", "aspect_bucket_alignment": 8}, "multiples of 16"),
    ({"model_family": "sana", "prediction_type": "epsilon"}, "prediction_type='epsilon'"),
    ({"model_family": "pixart_sigma", "prediction_type": "flow_matching"}, "prediction_type='flow_matching'"),
    ({"model_family": "lumina2", "model_flavour": "3.0"}, "model_flavour='3.0'"),
    ({"model_family": "sana", "tokenizer_max_length": 1}, "tokenizer_max_length=1"),
])
def test_settings_problems_name_the_option(values, fragment):
    problems = _problems(**values)
    assert any(fragment in problem for problem in problems), problems


def test_flow_families_use_flow_matching(loaded):
    for family in ("sana", "lumina2"):
        model = loaded[family]
        assert model.prediction_type() == "flow_matching" and model.flow_matching
        assert type(model.components.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    pixart = loaded["pixart_sigma"]
    assert pixart.prediction_type() == "epsilon" and not pixart.flow_matching
    assert type(pixart.components.noise_scheduler).__name__ == "DDPMScheduler"
    # Sana's shipped flow DPM-Solver stays the inference scheduler.
    assert type(loaded["sana"].components.extras["inference_scheduler"]).__name__ == "DPMSolverMultistepScheduler"
