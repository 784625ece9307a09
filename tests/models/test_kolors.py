"""kolors family on its tiny random-weight model (ChatGLM3 + SDXL-shaped UNet), loaded through from_pretrained."""

import pytest
import torch

from helpers.families import make_batch, make_family
from simpletuner.config.settings import Settings
from simpletuner.config.validate import validate_settings
from simpletuner.models.kolors import KOLORS_PROMPT_LENGTH
from simpletuner.models.registry import get_family

FAMILIES = ("kolors",)
CPU = torch.device("cpu")
PROMPTS = ["a red circle on a blue background", "horizontal green stripes"]
CHATGLM_WIDTH = 32  # the tiny ChatGLM's hidden size


def test_tiny_tokenizer_pads_left_after_chatglm_prefix(model_dirs):
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    from simpletuner.models.tiny.kolors import make_chatglm_tokenizer

    tokenizer = ChatGLMTokenizer.from_pretrained(model_dirs["kolors"], subfolder="tokenizer")
    tokens = tokenizer(["a red circle"], padding="max_length", max_length=8)
    prefix = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    assert tokens["input_ids"][0][:3] == [tokenizer.pad_token_id] * 3 and tokens["input_ids"][0][3:5] == prefix
    assert tokens["attention_mask"][0] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert tokenizer.convert_ids_to_tokens(tokens["input_ids"][0][5:]) == ["▁a", "▁red", "▁circle"]
    with open(f"{model_dirs['kolors']}/tokenizer/tokenizer.model", "rb") as handle:
        saved = handle.read()
    rebuilt = make_chatglm_tokenizer()
    with open(rebuilt.vocab_file, "rb") as handle:
        assert handle.read() == saved  # the SentencePiece model is trained the same way every time


def test_load_returns_frozen_components(loaded):
    from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer

    components = loaded["kolors"].components
    assert components.denoiser.config.encoder_hid_dim_type == "text_proj"
    assert isinstance(components.text_encoders[0], ChatGLMModel)
    assert isinstance(components.tokenizers[0], ChatGLMTokenizer)
    for module in (components.vae, components.text_encoders[0]):
        assert not any(parameter.requires_grad for parameter in module.parameters())
    assert components.vae.dtype == torch.float32
    assert components.noise_scheduler.config.num_train_timesteps == 1100  # Kolors' own schedule, kept
    assert components.noise_scheduler.config.prediction_type == "epsilon"
    assert type(components.extras["inference_scheduler"]).__name__ == "EulerDiscreteScheduler"


def test_encode_text_matches_the_pipeline(loaded):
    model = loaded["kolors"]
    text = model.encode_text(PROMPTS)
    assert text["prompt_embeds"].shape == (2, KOLORS_PROMPT_LENGTH, CHATGLM_WIDTH)
    assert text["pooled_prompt_embeds"].shape == (2, CHATGLM_WIDTH)
    embeds, _, pooled, _ = model.build_pipeline().encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert torch.equal(embeds, text["prompt_embeds"])
    assert torch.equal(pooled, text["pooled_prompt_embeds"])
    # Left padding: a prompt's states do not depend on what else is in the batch.
    alone = model.encode_text(PROMPTS[1:])
    torch.testing.assert_close(alone["pooled_prompt_embeds"], text["pooled_prompt_embeds"][1:])


def test_predict_is_what_the_pipeline_step_computes(loaded):
    """The UNet call the pipeline makes (pooled text + size time ids) equals predict on a cached batch."""
    model = loaded["kolors"]
    pipeline = model.build_pipeline()
    calls = []

    def record(module, args, kwargs, output):
        calls.append((args[0].clone(), args[1], kwargs["added_cond_kwargs"], output[0].clone()))

    hook = pipeline.unet.register_forward_hook(record, with_kwargs=True)
    try:
        pipeline(PROMPTS[0], num_inference_steps=1, height=64, width=96, guidance_scale=1.0, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    sample, timestep, added, expected = calls[0]
    assert added["time_ids"].tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]]
    batch = make_batch(model, sample, PROMPTS[:1], sizes=(64, 96))
    with torch.no_grad():
        prediction = model.predict(batch, sample, timestep.reshape(1))
    torch.testing.assert_close(prediction, expected)


def test_micro_conditioning_and_gradients_reach_the_unet(loaded):
    model = loaded["kolors"]
    unet = model.components.denoiser
    latents = torch.randn(2, 4, 8, 8)
    batch = make_batch(model, latents, PROMPTS, sizes=(64, 64))
    timesteps = torch.tensor([50, 1000])
    unet.requires_grad_(True)
    try:
        first = model.predict(batch, latents, timesteps)
        first.pow(2).mean().backward()
        assert unet.encoder_hid_proj.weight.grad.abs().sum() > 0  # the ChatGLM -> cross-attention projection
        batch.original_sizes = [(1024, 512)] * 2
        with torch.no_grad():
            assert not torch.allclose(first.detach(), model.predict(batch, latents, timesteps))
    finally:
        unet.zero_grad(set_to_none=True)
        unet.requires_grad_(False)


def test_latents_are_8x_down_and_round_trip(loaded):
    model = loaded["kolors"]
    pixels = torch.rand(2, 3, 64, 96) * 2 - 1
    latents = model.encode_images(pixels)
    assert latents.shape == (2, 4, 8, 12)
    assert model.decode_latents(latents).shape == (2, 3, 64, 96)


def test_pipeline_renders_from_the_cached_embeds_as_from_the_prompt(loaded):
    model = loaded["kolors"]
    pipeline = model.build_pipeline()
    assert type(pipeline) is model.pipeline_class
    assert type(model.build_pipeline(img2img=True)) is model.img2img_pipeline_class
    text = model.encode_text(PROMPTS[:1])
    common = dict(num_inference_steps=2, height=64, width=64, output_type="pt", guidance_scale=1.0)
    from_prompt = pipeline(PROMPTS[0], generator=torch.Generator().manual_seed(0), **common).images
    from_cache = pipeline(prompt_embeds=text["prompt_embeds"], pooled_prompt_embeds=text["pooled_prompt_embeds"],
                          generator=torch.Generator().manual_seed(0), **common).images
    assert from_prompt.shape == (1, 3, 64, 64) and torch.isfinite(from_prompt).all()
    assert torch.equal(from_prompt, from_cache)


def test_text_encoders_reload_on_their_own(loaded):
    model = loaded["kolors"]
    reloaded = model.load_text_encoders(torch.float32)[0]
    original = model.components.text_encoders[0].state_dict()
    assert all(torch.equal(value, original[key]) for key, value in reloaded.state_dict().items())


def _problems(**values):
    base = {"model_family": "kolors", "model_type": "lora", "optimizer": "adamw_bf16",
            "data_backend_config": "d.json", "output_dir": "o", "max_train_steps": 1}
    return [str(error) for error in validate_settings(Settings({**base, **values}))]


@pytest.mark.parametrize("values,fragment", [
    ({"pretrained_model_name_or_path": "kolors.safetensors"}, "single-file"),
    ({"train_text_encoder": True}, "train_text_encoder is not supported"),
    ({"tokenizer_max_length": 77}, "tokenizer_max_length=77"),
    ({"vae_dtype": "fp16"}, "vae_dtype='fp16'"),
    ({"model_flavour": "2.0"}, "model_flavour='2.0'"),
    ({"prediction_type": "flow_matching"}, "prediction_type='flow_matching'"),
])
def test_settings_problems_name_the_option(values, fragment):
    problems = _problems(**values)
    assert any(fragment in problem for problem in problems), problems


def test_defaults_are_accepted_and_point_at_the_hub_model():
    assert not _problems()
    assert not _problems(tokenizer_max_length=KOLORS_PROMPT_LENGTH)
    family = get_family("kolors")
    assert family.model_path(Settings({"model_family": "kolors"})) == "Kwai-Kolors/Kolors-diffusers"


def test_single_file_is_refused_at_load_too(model_dirs):
    model = make_family(model_dirs, "kolors", pretrained_model_name_or_path="weights/kolors.safetensors")
    with pytest.raises(ValueError, match="single-file"):
        model.load(CPU, torch.float32)
