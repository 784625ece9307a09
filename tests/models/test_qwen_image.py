"""qwen_image on its tiny random-weight model, loaded through from_pretrained like the real one."""

import pytest
import torch

from helpers.families import make_batch, make_family
from simpletuner.config.settings import Settings
from simpletuner.config.validate import validate_settings
from simpletuner.data.batches import stack_padded

FAMILIES = ("qwen_image",)
CPU = torch.device("cpu")
PROMPTS = ["a red circle on a blue background", "horizontal green stripes"]


@pytest.fixture(scope="module")
def model(loaded):
    return loaded["qwen_image"]


@pytest.fixture(scope="module")
def pipeline(model_dirs):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(model_dirs["qwen_image"])


def render(pipeline, **arguments):
    arguments = {"height": 64, "width": 64, **arguments}
    return pipeline(num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0),
                    **arguments).images


def test_tiny_pipeline_loads_and_renders(pipeline):
    images = render(pipeline, prompt="a red circle")
    assert images.shape == (1, 3, 64, 64)
    assert torch.isfinite(images).all()


def test_load_gives_frozen_components_and_flow_schedulers(model):
    components = model.components
    assert type(components.denoiser).__name__ == "QwenImageTransformer2DModel"
    assert type(components.vae).__name__ == "AutoencoderKLQwenImage"
    assert type(components.text_encoders[0]).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(components.tokenizers[0]).__name__ == "Qwen2Tokenizer"
    for frozen in (components.vae, components.text_encoders[0]):
        assert not any(parameter.requires_grad for parameter in frozen.parameters())
    assert model.flow_matching and model.prediction_type() == "flow_matching"
    assert type(components.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    # Inference keeps the shipped resolution-dependent shift.
    assert components.extras["inference_scheduler"].config.use_dynamic_shifting


def test_tiny_tokenizer_splits_the_system_prompt_like_qwens(model, pipeline):
    """The pipeline drops a fixed count of leading tokens: the tiny vocabulary must give that count too."""
    template = pipeline.prompt_template_encode
    system_prefix = template.split("{}")[0]
    tokens = model.components.tokenizers[0](system_prefix)["input_ids"]
    assert len(tokens) == pipeline.prompt_template_encode_start_idx == 34


def test_encode_text_is_what_the_pipeline_computes(model, pipeline):
    text = model.encode_text(PROMPTS + [""])
    embeds, mask = pipeline.encode_prompt(PROMPTS + [""], device=CPU, max_sequence_length=512)
    assert torch.equal(text["prompt_embeds"], embeds)
    assert torch.equal(text["prompt_attention_mask"], mask)
    lengths = text["prompt_attention_mask"].sum(dim=1).tolist()
    # The caption's tokens plus the template's closing "<|im_end|>\n<|im_start|>assistant\n" (5 tokens).
    assert lengths == [7 + 5, 3 + 5, 5]


def test_a_mask_is_cached_even_when_no_prompt_is_padded(model):
    text = model.encode_text(["a red circle"])
    assert torch.equal(text["prompt_attention_mask"], torch.ones(1, 3 + 5, dtype=torch.long))


def test_cached_embeds_reproduce_the_pipelines_own_render(model):
    pipeline = model.build_pipeline()
    text = model.encode_text(["a red circle"])
    from_prompt = render(pipeline, prompt="a red circle", **model.pipeline_call_arguments())
    from_cache = render(pipeline, prompt_embeds=text["prompt_embeds"],
                        prompt_embeds_mask=text["prompt_attention_mask"], **model.pipeline_call_arguments())
    assert torch.equal(from_prompt, from_cache)


def test_predict_is_what_the_pipelines_denoising_step_computes(model, pipeline):
    """Capture the transformer call inside a render and repeat it through predict (trainer time = sigma * 1000)."""
    calls = []
    hook = pipeline.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs, output[0])), with_kwargs=True)
    try:
        render(pipeline, prompt=PROMPTS, height=64, width=32)
    finally:
        hook.remove()
    kwargs, output = calls[-1]
    from simpletuner.models.flux import unpack_latents

    noisy = unpack_latents(kwargs["hidden_states"], 8, 4)
    batch = make_batch(model, noisy, PROMPTS, sizes=(32, 64))
    prediction = model.predict(batch, noisy, kwargs["timestep"] * 1000)
    assert torch.allclose(prediction, unpack_latents(output, 8, 4), atol=1e-5)


def test_padded_batches_predict_what_each_prompt_predicts_alone(model):
    """Cached prompts of different lengths are zero-padded into one batch; the mask keeps padding out."""
    latents = torch.randn(2, 16, 8, 8)
    rows = [model.encode_text([prompt]) for prompt in PROMPTS]
    padded = {name: stack_padded([row[name][0] for row in rows]) for name in rows[0]}
    assert padded["prompt_attention_mask"][1].sum() < padded["prompt_attention_mask"].shape[1]
    batch = make_batch(model, latents, PROMPTS, sizes=(64, 64))
    batch.text = padded
    timesteps = torch.tensor([700.0, 300.0])
    together = model.predict(batch, latents, timesteps)
    for index, row in enumerate(rows):
        single = make_batch(model, latents[index:index + 1], [PROMPTS[index]], sizes=(64, 64))
        single.text = row
        alone = model.predict(single, latents[index:index + 1], timesteps[index:index + 1])
        assert torch.allclose(together[index:index + 1], alone, atol=1e-5)
    batch.text = {**padded, "prompt_attention_mask": torch.ones_like(padded["prompt_attention_mask"])}
    assert not torch.allclose(model.predict(batch, latents, timesteps)[1], together[1], atol=1e-5), \
        "unmasked padding should change the prediction (else this test could not fail)"


def test_latents_are_normalised_the_way_the_pipeline_decodes_them(model):
    pixels = torch.rand(2, 3, 64, 48) * 2 - 1
    latents = model.encode_images(pixels)
    assert latents.shape == (2, 16, 8, 6)
    vae = model.components.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        raw = vae.encode(pixels.unsqueeze(2)).latent_dist.mean
        # QwenImagePipeline: latents / (1 / std) + mean, then decode the single frame.
        expected = vae.decode(latents.unsqueeze(2) / (1.0 / std) + mean).sample[:, :, 0].clamp(-1, 1)
    assert torch.allclose(latents, ((raw - mean) / std).squeeze(2), atol=1e-6)
    assert torch.allclose(model.decode_latents(latents), expected, atol=1e-5)


def test_tokenizer_max_length_caps_the_prompt(model_dirs):
    short = make_family(model_dirs, "qwen_image", tokenizer_max_length=4)
    short.load(CPU, torch.float32)
    text = short.encode_text(PROMPTS)
    assert text["prompt_embeds"].shape[1] == 4
    assert short.pipeline_call_arguments()["max_sequence_length"] == 4
    assert short.fingerprint() != make_family(model_dirs, "qwen_image").fingerprint()


def test_validation_guidance_is_the_pipelines_true_cfg_scale(model_dirs):
    family = make_family(model_dirs, "qwen_image", validation_guidance=3.5)
    assert family.pipeline_call_arguments() == {"max_sequence_length": 512, "true_cfg_scale": 3.5}


def _problems(**values):
    base = {"model_family": "qwen_image", "model_type": "lora", "optimizer": "adamw_bf16",
            "data_backend_config": "d.json", "output_dir": "o", "max_train_steps": 1}
    return [str(error) for error in validate_settings(Settings({**base, **values}))]


@pytest.mark.parametrize("values,fragment", [
    ({"aspect_bucket_alignment": 8}, "multiples of 16"),
    ({"prediction_type": "epsilon"}, "prediction_type='epsilon'"),
    ({"model_flavour": "v2.0"}, "model_flavour='v2.0'"),
    ({"tokenizer_max_length": 2048}, "tokenizer_max_length=2048"),
    ({"train_text_encoder": True}, "train_text_encoder"),
    ({"controlnet": True}, "Qwen-Image ControlNet training"),
])
def test_settings_problems_name_the_option(values, fragment):
    problems = _problems(**values)
    assert any(fragment in problem for problem in problems), problems


def test_default_settings_have_no_problems():
    assert not _problems()
