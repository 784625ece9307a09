"""Tiny Wan 2.1 text-to-video pipeline: UMT5 encoder, 3D causal VAE (8x spatial, 4x temporal), Wan transformer.

The VAE keeps Wan's layout (three spatial downsamples, two temporal ones)
with its own per-channel latents_mean/latents_std, so the normalisation
WanPipeline applies is exercised. The scheduler is the one the Wan 2.1
Diffusers repositories ship: UniPC over flow sigmas with flow_shift 3.0.
"""

from __future__ import annotations

from simpletuner.models.tiny.auraflow import umt5_encoder
from simpletuner.models.tiny.sd3 import make_t5_tokenizer

LATENT_CHANNELS = 4
TEXT_WIDTH = 32


def _vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2, 2, 2],  # three downsamples: 8x, as the real VAE
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # 4x in time
        latents_mean=[0.1, -0.2, 0.3, -0.05],
        latents_std=[1.5, 0.8, 2.0, 1.1],
    )


def _transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,  # rotary embedding splits it over time, height and width
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        text_dim=TEXT_WIDTH,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=64,
    )


def _build_wan():
    from diffusers import UniPCMultistepScheduler, WanPipeline

    tokenizer = make_t5_tokenizer()
    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=umt5_encoder(tokenizer, TEXT_WIDTH),
        vae=_vae(),
        transformer=_transformer(),
        scheduler=scheduler,
    )


BUILDERS = {"wan": (_build_wan, "WanPipeline")}
