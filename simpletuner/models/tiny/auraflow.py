"""Tiny AuraFlow pipeline: UMT5 text encoder (Pile-T5 style), 4-channel SDXL-style VAE, MMDiT + single DiT blocks."""

from __future__ import annotations

from simpletuner.models.tiny.components import vae
from simpletuner.models.tiny.sd3 import make_t5_tokenizer, t5_config_values

AURAFLOW_SCHEDULER_SHIFT = 1.73  # the shift AuraFlow v0.3 ships
SDXL_VAE_SCALING_FACTOR = 0.13025


def umt5_encoder(tokenizer, width: int):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(**t5_config_values(tokenizer, width))).eval()


def _auraflow_transformer(joint_attention_dim: int):
    from diffusers import AuraFlowTransformer2DModel

    return AuraFlowTransformer2DModel(
        sample_size=8,  # 64 px at the VAE's 8x
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=32,  # equals heads * head_dim, as the model requires
        out_channels=4,
        pos_embed_max_size=256,  # a 16 x 16 grid of learned positions: 128 px sides
    )


def _build_auraflow():
    from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler

    tokenizer = make_t5_tokenizer()
    width = 64
    return AuraFlowPipeline(
        tokenizer=tokenizer,
        text_encoder=umt5_encoder(tokenizer, width),
        vae=vae(SDXL_VAE_SCALING_FACTOR),
        transformer=_auraflow_transformer(joint_attention_dim=width),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=AURAFLOW_SCHEDULER_SHIFT),
    )


# family -> (builder, pipeline class name written in model_index.json)
BUILDERS = {"auraflow": (_build_auraflow, "AuraFlowPipeline")}
