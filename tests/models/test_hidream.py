"""hidream family on its tiny random-weight model (4 text encoders, 2-expert MoE), loaded through from_pretrained."""

import json

import pytest
import torch

from helpers.families import make_batch, make_family
from simpletuner.config.settings import Settings
from simpletuner.models.hidream import LLAMA_SOURCE, HiDream
from simpletuner.models.hidream_moe import balance_term
from simpletuner.models.registry import get_family
from simpletuner.training.loss_step import LossStep

FAMILIES = ("hidream",)
PROMPTS = ["a red circle on a blue background", "", "horizontal green stripes"]
SQUARE = (1, 16, 8, 8)  # latents of a 64px image (the tiny transformer's whole area)
WIDE = (2, 16, 4, 8)  # 32x64 px: a non-square grid, padded inside the transformer


def sharing(loaded, model_dirs, **options):
    """A hidream family with other options that reuses the loaded components (no second load)."""
    model = make_family(model_dirs, "hidream", **options)
    model.components = loaded["hidream"].components
    return model


def latents(shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_load_returns_frozen_components_with_four_encoders(loaded):
    model = loaded["hidream"]
    components = model.components
    assert model.flow_matching and model.prediction_type() == "flow_matching"
    assert type(components.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert [type(e).__name__ for e in components.text_encoders] == [
        "CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel", "LlamaForCausalLM"]
    for part in [components.vae, *components.text_encoders]:
        assert not any(p.requires_grad for p in part.parameters())
    llama_tokenizer = components.tokenizers[3]
    assert llama_tokenizer.pad_token == llama_tokenizer.eos_token  # as HiDreamImagePipeline pads Llama


def test_encode_text_matches_the_pipeline(loaded):
    model = loaded["hidream"]
    text = model.encode_text(PROMPTS)
    assert text["pooled_prompt_embeds"].shape == (3, 32 + 48)  # CLIP-L + CLIP-G projections
    assert text["t5_prompt_embeds"].shape == (3, 128, 64)
    assert text["llama_prompt_embeds"].shape == (3, 2, 128, 32)  # batch first: (B, Llama layers, tokens, width)
    t5, _, llama, _, pooled, _ = model.build_pipeline().encode_prompt(
        PROMPTS, do_classifier_free_guidance=False, **model.pipeline_call_arguments())
    torch.testing.assert_close(pooled, text["pooled_prompt_embeds"])
    torch.testing.assert_close(t5, text["t5_prompt_embeds"])
    torch.testing.assert_close(llama, text["llama_prompt_embeds"].transpose(0, 1))
    assert not torch.allclose(text["llama_prompt_embeds"][:, 0], text["llama_prompt_embeds"][:, 1])


def test_prompt_length_and_t5_padding_options(loaded, model_dirs):
    default = loaded["hidream"]
    short = sharing(loaded, model_dirs, tokenizer_max_length=24)
    text = short.encode_text(PROMPTS[:1])
    assert text["t5_prompt_embeds"].shape[1] == text["llama_prompt_embeds"].shape[2] == 24
    assert short.pipeline_call_arguments()["max_sequence_length"] == 24
    zeroed = sharing(loaded, model_dirs, t5_padding="zero")
    kept = default.encode_text(PROMPTS[:1])["t5_prompt_embeds"][0]
    cleared = zeroed.encode_text(PROMPTS[:1])["t5_prompt_embeds"][0]
    used = len(default.components.tokenizers[2](PROMPTS[0]).input_ids)
    assert kept[used:].abs().sum() > 0 and cleared[used:].abs().sum() == 0
    torch.testing.assert_close(cleared[:used], kept[:used])
    assert len({default.fingerprint(), short.fingerprint(), zeroed.fingerprint()}) == 3


def test_predict_is_the_velocity_one_pipeline_step_uses(loaded):
    """A one-step render moves latents from sigma 1 to 0: out = x - v. predict at timestep 1000 must give v."""
    model = loaded["hidream"]
    start = latents(SQUARE)
    batch = make_batch(model, start, PROMPTS[:1], sizes=(64, 64))
    text = batch.text
    with torch.no_grad():
        velocity = model.predict(batch, start, torch.tensor([1000.0]))
        stepped = model.build_pipeline()(
            pooled_prompt_embeds=text["pooled_prompt_embeds"], prompt_embeds_t5=text["t5_prompt_embeds"],
            prompt_embeds_llama3=text["llama_prompt_embeds"].transpose(0, 1), latents=start.clone(),
            num_inference_steps=1, guidance_scale=1.0, output_type="latent", height=64, width=64).images
    torch.testing.assert_close(stepped, start - velocity, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [SQUARE, WIDE], ids=["square", "non-square"])
def test_training_mode_output_is_reassembled_and_reaches_the_weights(loaded, shape):
    """In train mode the transformer answers in patches (and routes experts with gradients); predict must give
    the same latents as in eval mode, and its gradient must reach the experts."""
    model = loaded["hidream"]
    transformer = model.components.denoiser
    noisy = latents(shape)
    batch = make_batch(model, noisy, PROMPTS[: shape[0]], sizes=(shape[2] * 8, shape[3] * 8))
    timesteps = torch.tensor([300.0, 700.0][: shape[0]])
    with torch.no_grad():
        evaluated = model.predict(batch, noisy, timesteps)
    transformer.train()
    transformer.requires_grad_(True)
    try:
        trained = model.predict(batch, noisy, timesteps)
        torch.testing.assert_close(trained, evaluated, rtol=1e-4, atol=1e-4)
        trained.pow(2).mean().backward()
        experts = transformer.double_stream_blocks[0].block.ff_i.experts
        assert any(expert.w2.weight.grad is not None and expert.w2.weight.grad.abs().sum() > 0 for expert in experts)
    finally:
        transformer.zero_grad(set_to_none=True)
        transformer.requires_grad_(False)
        transformer.eval()


def test_predict_refuses_grids_it_cannot_patch(loaded):
    model = loaded["hidream"]
    odd = latents((1, 16, 8, 6 + 1))
    with pytest.raises(ValueError, match="multiples of 16 pixels"):
        model.predict(make_batch(model, odd, PROMPTS[:1]), odd, torch.tensor([500.0]))
    too_wide = latents((1, 16, 8, 16))  # 32 patches, more than the tiny transformer's 16
    with pytest.raises(ValueError, match="maximum area"):
        model.predict(make_batch(model, too_wide, PROMPTS[:1]), too_wide, torch.tensor([500.0]))


def test_pipeline_renders_the_transformer_area_in_two_steps(loaded):
    model = loaded["hidream"]
    pipeline = model.build_pipeline()
    assert type(pipeline) is model.pipeline_class
    assert pipeline.default_sample_size == 8  # the tiny transformer's max_resolution, in latents
    image = pipeline(PROMPTS[0], num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    with pytest.raises(ValueError, match="no img2img"):
        model.build_pipeline(img2img=True)


def test_balance_term_is_diffusers_gate_loss_without_its_alpha(loaded):
    gate = loaded["hidream"].components.denoiser.single_stream_blocks[0].block.ff_i.gate
    hidden = torch.randn(2, 10, gate.gating_dim, generator=torch.Generator().manual_seed(3))
    gate.train()
    try:
        chosen, _, diffusers_loss = gate(hidden)
    finally:
        gate.eval()
    term = balance_term(hidden, gate.weight, chosen, gate.n_routed_experts)
    torch.testing.assert_close(term * gate.alpha, diffusers_loss)
    even = torch.zeros(gate.n_routed_experts, gate.gating_dim)  # a router that scores every expert alike
    picks = torch.arange(20) % gate.n_routed_experts
    assert balance_term(hidden, even, picks, gate.n_routed_experts).item() == pytest.approx(1.0)


def test_load_balancing_loss_joins_the_training_loss(loaded, model_dirs, monkeypatch):
    """With the option on, the loss step adds weight x the balance terms of the two MoE layers (one per block)."""
    plain = loaded["hidream"]
    balanced = sharing(loaded, model_dirs, hidream_use_load_balancing_loss=True, hidream_load_balancing_loss_weight=0.5)
    recorded = []
    take = balanced.router_balance.take
    monkeypatch.setattr(balanced.router_balance, "take",
                        lambda: recorded.append([t.item() for t in balanced.router_balance.terms]) or take())
    clean = latents(SQUARE)
    transformer = plain.components.denoiser
    transformer.train()
    try:
        with torch.no_grad():
            losses = [LossStep(model, model.settings, torch.float32)(
                make_batch(model, clean, PROMPTS[:1], sizes=(64, 64)), 0, torch.Generator().manual_seed(0))
                for model in (plain, balanced)]
    finally:
        transformer.eval()
    assert plain.auxiliary_loss() is None
    assert len(recorded) == 1 and len(recorded[0]) == 2
    assert all(term > 0 for term in recorded[0])
    assert (losses[1] - losses[0]).item() == pytest.approx(0.5 * sum(recorded[0]), rel=1e-4)
    assert balanced.auxiliary_loss() is None, "terms are taken once"


def test_llama_comes_from_text_encoder_4_or_the_llama_repository(loaded, model_dirs, tmp_path):
    model = loaded["hidream"]
    path = model_dirs["hidream"]
    assert model.llama_location(path) == (path, "text_encoder_4", "tokenizer_4")
    with open(f"{path}/model_index.json", encoding="utf-8") as handle:
        index = json.load(handle)
    index["text_encoder_4"] = index["tokenizer_4"] = [None, None]  # as the HiDream-ai repositories ship it
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert model.llama_location(str(tmp_path)) == (LLAMA_SOURCE, "", "")


def test_check_settings_and_flavours():
    hidream = get_family("hidream")
    assert hidream is HiDream
    assert hidream.check_settings(Settings({"model_family": "hidream"})) == []
    messages = " ".join(hidream.check_settings(Settings({
        "model_family": "hidream", "model_flavour": "i2", "tokenizer_max_length": 600, "aspect_bucket_alignment": 8,
        "hidream_load_balancing_loss_weight": -1, "train_text_encoder": True})))
    for fragment in ("model_flavour='i2'", "tokenizer_max_length=600", "aspect_bucket_alignment=8",
                     "hidream_load_balancing_loss_weight=-1", "train_text_encoder"):
        assert fragment in messages
    assert hidream.model_path(Settings({})) == "HiDream-ai/HiDream-I1-Full"
    assert hidream.model_path(Settings({"model_flavour": "dev"})) == "HiDream-ai/HiDream-I1-Dev"
    assert {"to_q", "to_out", "to_q_t", "to_out_t"} <= set(hidream.default_lora_targets)


def test_a_gguf_transformer_loads_with_plain_router_weights(loaded, model_dirs, tmp_path):
    """GGUF files quantise the routers' matrices too; MoEGate cannot multiply those, so the loader dequantises them."""
    pytest.importorskip("gguf")
    from diffusers import HiDreamImageTransformer2DModel
    from diffusers.quantizers.gguf.utils import GGUFLinear

    from helpers.gguf_files import transformer_to_gguf

    path = tmp_path / "hidream-Q8_0.gguf"
    stored = transformer_to_gguf(model_dirs["hidream"], HiDreamImageTransformer2DModel, path, "hidream")
    assert stored["double_stream_blocks.0.block.ff_i.gate.weight"] == "Q8_0"
    model = make_family(model_dirs, "hidream", pretrained_transformer_model_name_or_path=str(path))
    model.load(torch.device("cpu"), torch.float32)
    transformer = model.components.denoiser
    assert any(isinstance(layer, GGUFLinear) for layer in transformer.modules())
    gate = transformer.double_stream_blocks[0].block.ff_i.gate
    assert type(gate.weight) is torch.nn.Parameter and gate.weight.shape == (2, 32)
    noisy = latents(SQUARE)
    batch = make_batch(loaded["hidream"], noisy, PROMPTS[:1], sizes=(64, 64))
    with torch.no_grad():
        quantised = model.predict(batch, noisy, torch.tensor([500.0]))
        exact = loaded["hidream"].predict(batch, noisy, torch.tensor([500.0]))
    assert (quantised - exact).abs().max() < 0.05 * exact.abs().max()
