"""Tiny Lumina 2 pipeline: Gemma 2 encoder, the Flux VAE (16 channels, scale and shift), Lumina 2 transformer."""

from __future__ import annotations

from simpletuner.models.tiny.flux import flux_vae
from simpletuner.models.tiny.sana import gemma2_encoder, make_gemma_tokenizer


def _transformer(caption_channels: int):
    from diffusers import Lumina2Transformer2DModel

    return Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        hidden_size=32,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),  # sums to the head size (32 / 2)
        axes_lens=(300, 512, 512),
        cap_feat_dim=caption_channels,
    )


def _build_lumina2():
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

    tokenizer = make_gemma_tokenizer()
    text_encoder = gemma2_encoder(tokenizer)
    return Lumina2Pipeline(
        transformer=_transformer(caption_channels=text_encoder.config.hidden_size),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0),  # Lumina 2 samples with shift 6
        vae=flux_vae(),  # Lumina 2 decodes with the Flux VAE (16 channels, scale and shift)
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )


BUILDERS = {"lumina2": (_build_lumina2, "Lumina2Pipeline")}
