"""Tiny PixArt Sigma pipeline: T5 encoder, 4-channel VAE, PixArt transformer with learned sigma.

The T5 tokenizer and encoder are the tiny ones shared by the T5 families (tiny/sd3.py).
"""

from __future__ import annotations

from simpletuner.models.tiny.components import vae
from simpletuner.models.tiny.sd3 import make_t5_tokenizer, t5_encoder

T5_WIDTH = 32


def _transformer(caption_channels: int):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned sigma: noise and variance halves, as the real model
        num_layers=2,
        cross_attention_dim=16,
        sample_size=32,  # one of the sizes PixArtSigmaPipeline has an aspect-ratio table for (256px)
        patch_size=2,
        caption_channels=caption_channels,
        use_additional_conditions=False,  # Sigma has no resolution / aspect-ratio embedding
    )


def _build_pixart_sigma():
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    tokenizer = make_t5_tokenizer()
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon",
    )
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(tokenizer, T5_WIDTH),
        vae=vae(0.13025),  # the SDXL VAE's scaling, which PixArt Sigma uses
        transformer=_transformer(caption_channels=T5_WIDTH),
        scheduler=scheduler,
    )


BUILDERS = {"pixart_sigma": (_build_pixart_sigma, "PixArtSigmaPipeline")}
