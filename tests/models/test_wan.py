"""wan family (Wan 2.1 text-to-video, trained on images as one-frame videos) on its tiny model."""

from contextlib import nullcontext

import pytest
import torch

from helpers.families import make_batch, make_family
from simpletuner.config.settings import Settings
from simpletuner.config.validate import validate_settings
from simpletuner.validation.renderer import _Sampler

FAMILIES = ("wan",)
CPU = torch.device("cpu")
PROMPTS = ["a red circle on a blue background", "horizontal green stripes"]
RENDER = dict(num_inference_steps=2, height=32, width=32, guidance_scale=1.0)


def test_load_gives_frozen_components_and_flow_schedulers(loaded):
    model = loaded["wan"]
    parts = model.components
    assert type(parts.denoiser).__name__ == "WanTransformer3DModel"
    assert type(parts.vae).__name__ == "AutoencoderKLWan"
    assert type(parts.text_encoders[0]).__name__ == "UMT5EncoderModel"
    assert not any(p.requires_grad for p in parts.vae.parameters())
    assert not any(p.requires_grad for p in parts.text_encoders[0].parameters())
    assert type(parts.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert type(parts.extras["inference_scheduler"]).__name__ == "UniPCMultistepScheduler"
    assert model.flow_matching and model.prediction_type() == "flow_matching"


def test_text_embeds_are_the_pipelines_zero_padded_prompts(loaded):
    model = loaded["wan"]
    text = model.encode_text(PROMPTS + [""])
    embeds = text["prompt_embeds"]
    assert embeds.shape[:2] == (3, 512)
    pipeline = model.build_pipeline()
    expected, _ = pipeline.encode_prompt(PROMPTS + [""], do_classifier_free_guidance=False, max_sequence_length=512)
    assert torch.equal(embeds, expected)
    tokens = model.components.tokenizers[0](PROMPTS[0]).input_ids
    assert embeds[0, len(tokens):].abs().sum() == 0 and embeds[0, :len(tokens)].abs().sum() > 0


def test_tokenizer_max_length_sets_the_prompt_length(model_dirs):
    model = make_family(model_dirs, "wan", tokenizer_max_length=24)
    model.load(CPU, torch.float32)
    assert model.encode_text(PROMPTS)["prompt_embeds"].shape[1] == 24
    assert model.pipeline_call_arguments() == {"max_sequence_length": 24, "num_frames": 1}
    assert model.fingerprint() != make_family(model_dirs, "wan").fingerprint()


def test_latents_are_one_frame_normalised_as_the_pipeline_undoes_it(loaded):
    model = loaded["wan"]
    vae = model.components.vae
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = model.encode_images(pixels)
    assert latents.shape == (2, 4, 4, 4)
    raw = vae.encode(pixels.unsqueeze(2)).latent_dist.mean
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(latents, ((raw - mean) / std).squeeze(2))
    decoded = model.decode_latents(latents)
    torch.testing.assert_close(decoded, vae.decode(raw).sample.squeeze(2).clamp(-1, 1))


def test_predict_is_what_the_pipeline_step_uses(loaded):
    """The pipeline's transformer call, seen through a hook, equals ``predict`` on the same input."""
    model = loaded["wan"]
    pipeline = model.build_pipeline()
    text = model.encode_text(["a red circle"])
    seen = []

    def record(module, args, kwargs, output):
        seen.append((kwargs["hidden_states"].clone(), kwargs["timestep"].clone(), output[0].clone()))

    handle = model.components.denoiser.register_forward_hook(record, with_kwargs=True)
    try:
        pipeline(prompt_embeds=text["prompt_embeds"], generator=torch.Generator().manual_seed(0), output_type="pt",
                 **RENDER, **model.pipeline_call_arguments())
    finally:
        handle.remove()
    hidden, timestep, output = seen[0]
    assert hidden.shape[2] == 1, "one latent frame"
    batch = make_batch(model, hidden.squeeze(2), ["a red circle"], sizes=(32, 32))
    with torch.no_grad():
        prediction = model.predict(batch, hidden.squeeze(2), timestep)
    torch.testing.assert_close(prediction, output.squeeze(2))


def test_cached_embeds_reproduce_the_pipelines_render_and_validation_keeps_the_frame(loaded):
    model = loaded["wan"]
    pipeline = model.build_pipeline()
    text = model.encode_text(["a red circle"])
    common = dict(output_type="pt", **RENDER, **model.pipeline_call_arguments())
    from_prompt = pipeline("a red circle", generator=torch.Generator().manual_seed(0), **common).frames
    from_cache = pipeline(prompt_embeds=text["prompt_embeds"], generator=torch.Generator().manual_seed(0),
                          **common).frames
    assert from_prompt.shape == (1, 1, 3, 32, 32)
    assert torch.equal(from_prompt, from_cache)
    sampler = _Sampler(pipeline, model, model.settings)
    image = sampler.run("a red circle", {"height": 32, "width": 32, "num_inference_steps": 2},
                        torch.Generator().manual_seed(0), nullcontext)
    assert image.size == (32, 32)


@pytest.mark.parametrize("values,fragment", [
    ({"aspect_bucket_alignment": 8}, "multiples of 16"),
    ({"prediction_type": "epsilon"}, "prediction_type='epsilon'"),
    ({"model_flavour": "i2v-14b-2.2-high"}, "model_flavour='i2v-14b-2.2-high'"),
    ({"train_text_encoder": True}, "train_text_encoder"),
])
def test_settings_problems_name_the_option(values, fragment):
    base = {"model_family": "wan", "model_type": "full", "optimizer": "adamw_bf16", "data_backend_config": "d.json",
            "output_dir": "o", "max_train_steps": 1}
    problems = [str(error) for error in validate_settings(Settings({**base, **values}))]
    assert any(fragment in problem for problem in problems), problems


def test_default_settings_are_accepted():
    base = {"model_family": "wan", "model_type": "lora", "optimizer": "adamw_bf16", "data_backend_config": "d.json",
            "output_dir": "o", "max_train_steps": 1}
    assert not validate_settings(Settings(base))
