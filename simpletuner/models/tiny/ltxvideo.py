"""Tiny LTX-Video: a one-layer LTXVideoTransformer3DModel, a narrow AutoencoderKLLTXVideo with the real
model's 32x spatial / 8x temporal compression, and the tiny T5 shared with the other T5 families."""

from __future__ import annotations

from simpletuner.models.tiny.sd3 import make_t5_tokenizer, t5_encoder

T5_WIDTH = 32
LATENT_CHANNELS = 8


def _vae():
    from diffusers import AutoencoderKLLTXVideo

    # 4x4 patchify then three spatio-temporal downsamples: 32x in space and 8x in time, like the real VAE.
    return AutoencoderKLLTXVideo(
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
    )


def _transformer():
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=1,
        caption_channels=T5_WIDTH,
    )


def _build_ltxvideo():
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline

    tokenizer = make_t5_tokenizer()
    # The scheduler settings LTX-Video 0.9.x ships: a resolution-dependent shift.
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=1024, max_image_seq_len=4096, base_shift=0.95,
        max_shift=2.05, shift_terminal=0.1,
    )
    return LTXPipeline(
        scheduler=scheduler, vae=_vae(), text_encoder=t5_encoder(tokenizer, T5_WIDTH), tokenizer=tokenizer,
        transformer=_transformer(),
    )


BUILDERS = {"ltxvideo": (_build_ltxvideo, "LTXPipeline")}
