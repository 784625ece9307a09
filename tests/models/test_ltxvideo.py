"""ltxvideo family on a tiny random-weight LTX-Video, loaded through from_pretrained: still images as
one-frame videos."""

import torch

from helpers.families import make_batch, make_family
from simpletuner.config.settings import Settings
from simpletuner.models.registry import get_family

FAMILIES = ("ltxvideo",)
PROMPTS = ["a red circle on a blue background", "horizontal green stripes"]


def render(model, pipeline, **arguments) -> torch.Tensor:
    common = dict(num_inference_steps=2, height=64, width=64, output_type="pt", guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(0), **model.pipeline_call_arguments())
    return pipeline(**common, **arguments).frames


def test_load_gives_frozen_encoders_and_a_trainable_transformer(loaded):
    components = loaded["ltxvideo"].components
    assert not any(p.requires_grad for p in components.vae.parameters())
    assert not any(p.requires_grad for p in components.text_encoders[0].parameters())
    assert type(components.denoiser).__name__ == "LTXVideoTransformer3DModel"


def test_pipeline_renders_one_frame_and_validation_takes_it(loaded):
    model = loaded["ltxvideo"]
    pipeline = model.build_pipeline()
    frames = render(model, pipeline, prompt="a red circle")
    assert frames.shape == (1, 1, 3, 64, 64)  # (videos, frames, channels, H, W)
    result = pipeline("a red circle", num_inference_steps=2, height=64, width=64, output_type="pil",
                      **model.pipeline_call_arguments())
    assert model.rendered_image(result).size == (64, 64)


def test_cached_embeds_and_mask_reproduce_the_pipelines_own_render(loaded):
    model = loaded["ltxvideo"]
    text = model.encode_text(PROMPTS + [""])
    assert text["prompt_embeds"].shape[:2] == (3, 128)
    used = text["prompt_attention_mask"].sum(dim=1)
    assert (used > 0).all() and (used < 128).all(), "short prompts must leave padded positions masked"
    pipeline = model.build_pipeline()
    one = model.encode_text(["a red circle"])
    from_cache = render(model, pipeline, prompt_embeds=one["prompt_embeds"],
                        prompt_attention_mask=one["prompt_attention_mask"])
    assert torch.equal(render(model, pipeline, prompt="a red circle"), from_cache)


def test_latents_are_normalised_first_frames_that_round_trip(loaded):
    model = loaded["ltxvideo"]
    vae = model.components.vae
    with torch.no_grad():
        vae.latents_mean.fill_(0.25)  # non-trivial statistics, so the normalisation is really checked
        vae.latents_std.fill_(2.0)
    try:
        pixels = torch.rand(2, 3, 64, 64) * 2 - 1
        latents = model.encode_images(pixels)
        assert latents.shape == (2, 8, 2, 2)
        raw = vae.encode(pixels.unsqueeze(2)).latent_dist.mean[:, :, 0]
        assert torch.allclose(latents, (raw - 0.25) / 2.0, atol=1e-5)
        decoded = model.decode_latents(latents)
        direct = vae.decode(raw.unsqueeze(2), return_dict=False)[0][:, :, 0]
        assert decoded.shape == (2, 3, 64, 64) and torch.allclose(decoded, direct, atol=1e-5)
    finally:
        with torch.no_grad():
            vae.latents_mean.fill_(0.0)
            vae.latents_std.fill_(1.0)


def test_predict_is_the_pipelines_denoising_step(loaded):
    """predict on cached latents equals the transformer call LTXPipeline makes on its packed tokens."""
    model = loaded["ltxvideo"]
    latents = torch.randn(2, 8, 2, 2)
    timesteps = torch.tensor([700.0, 30.0])
    batch = make_batch(model, latents, PROMPTS, sizes=(64, 64))
    prediction = model.predict(batch, latents, timesteps)
    pipeline = model.build_pipeline()
    tokens = pipeline._pack_latents(latents.unsqueeze(2))
    expected = pipeline.transformer(
        hidden_states=tokens, encoder_hidden_states=batch.text["prompt_embeds"], timestep=timesteps,
        encoder_attention_mask=batch.text["prompt_attention_mask"], num_frames=1, height=2, width=2,
        rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)[0]
    assert torch.equal(prediction, pipeline._unpack_latents(expected, 1, 2, 2)[:, :, 0])


def test_settings_checks():
    ltx = get_family("ltxvideo")
    assert ltx.check_settings(Settings({"model_family": "ltxvideo"})) == []
    for values, option in (({"aspect_bucket_alignment": 16}, "aspect_bucket_alignment"),
                           ({"flow_schedule_auto_shift": True}, "flow_schedule_auto_shift"),
                           ({"train_text_encoder": True}, "train_text_encoder"),
                           ({"model_flavour": "2.0"}, "model_flavour"),
                           ({"validation_resolution": "768x520"}, "validation_resolution")):
        problems = ltx.check_settings(Settings({"model_family": "ltxvideo", **values}))
        assert len(problems) == 1 and option in problems[0]
    assert ltx.model_path(Settings({"model_family": "ltxvideo"})) == "Lightricks/LTX-Video-0.9.5"


def test_tokenizer_max_length_changes_the_fingerprint(model_dirs):
    short = make_family(model_dirs, "ltxvideo", tokenizer_max_length=24)
    assert short.pipeline_call_arguments()["max_sequence_length"] == 24
    assert short.fingerprint() != make_family(model_dirs, "ltxvideo").fingerprint()


def test_pretrained_t5_location_is_read_and_fingerprinted(model_dirs):
    shared = make_family(model_dirs, "ltxvideo", pretrained_t5_model_name_or_path=model_dirs["ltxvideo"])
    shared.load(torch.device("cpu"), torch.float32)
    assert type(shared.components.text_encoders[0]).__name__ == "T5EncoderModel"
    assert shared.fingerprint() != make_family(model_dirs, "ltxvideo").fingerprint()
