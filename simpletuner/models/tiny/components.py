"""Tiny versions of components several families share: CLIP text encoders and the 8x VAE."""

from __future__ import annotations

from simpletuner.models.tiny.tokenizer import CLIP_MAX_LENGTH


def clip_text_encoder(tokenizer, hidden: int, act: str, with_projection: bool, projection_dim: int = 32,
                      max_positions: int = CLIP_MAX_LENGTH):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,  # SDXL reads the penultimate hidden state
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        hidden_act=act,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # three downsamples: 8x, as the real VAE
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
    )
