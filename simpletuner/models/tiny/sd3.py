"""Tiny Stable Diffusion 3 pipeline, and the small T5 pieces other T5 families reuse.

The shapes keep what SD3 code relies on: a 16-channel VAE with a shift factor
and no quant convs, two CLIP encoders with projections (different widths, as
CLIP-L and CLIP-G), a T5 encoder wider than both CLIPs together (the pipeline
pads the CLIP states to T5's width), an MMDiT with RMS q/k norms and one
dual-attention block (as SD 3.5), and a shifted flow-matching scheduler.
"""

from __future__ import annotations

from simpletuner.models.tiny.components import clip_text_encoder
from simpletuner.models.tiny.tokenizer import TOKENIZER_WORDS, make_tokenizer

# SentencePiece-style unigram scores: whole words beat spelling a word out letter by letter.
_WORD_SCORE = -2.0
_CHARACTER_SCORE = -6.0
_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()"
SD3_SCALING_FACTOR = 1.5305
SD3_SHIFT_FACTOR = 0.0609
SD3_SCHEDULER_SHIFT = 3.0


def make_t5_tokenizer():
    """A T5 tokenizer (unigram, T5's <pad>=0, </s>=1, <unk>=2) over the tiny word list plus single characters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, _WORD_SCORE) for word in dict.fromkeys(TOKENIZER_WORDS)]
    pieces += [(character, _CHARACTER_SCORE) for character in _CHARACTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def t5_config_values(tokenizer, width: int) -> dict:
    """Arguments shared by the tiny T5 and UMT5 encoder configs."""
    return {
        "vocab_size": len(tokenizer),
        "d_model": width,
        "d_kv": 16,
        "d_ff": width,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,
    }


def t5_encoder(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**t5_config_values(tokenizer, width))).eval()


def sd3_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # three downsamples: 8x, as the real VAE
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=SD3_SCALING_FACTOR,
        shift_factor=SD3_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _sd3_transformer(joint_attention_dim: int, pooled_dim: int):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,  # 64 px at the VAE's 8x
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=32,
        pooled_projection_dim=pooled_dim,
        out_channels=16,
        pos_embed_max_size=16,  # room for 128 px sides
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def _build_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tokenizer = make_tokenizer()
    tokenizer_2 = make_tokenizer(pad_token="!")
    tokenizer_3 = make_t5_tokenizer()
    clip_l_width, clip_g_width, t5_width = 32, 48, 96
    return StableDiffusion3Pipeline(
        transformer=_sd3_transformer(joint_attention_dim=t5_width, pooled_dim=clip_l_width + clip_g_width),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SD3_SCHEDULER_SHIFT),
        vae=sd3_vae(),
        text_encoder=clip_text_encoder(tokenizer, clip_l_width, "quick_gelu", with_projection=True,
                                       projection_dim=clip_l_width),
        tokenizer=tokenizer,
        text_encoder_2=clip_text_encoder(tokenizer_2, clip_g_width, "gelu", with_projection=True,
                                         projection_dim=clip_g_width),
        tokenizer_2=tokenizer_2,
        text_encoder_3=t5_encoder(tokenizer_3, t5_width),
        tokenizer_3=tokenizer_3,
    )


# family -> (builder, pipeline class name written in model_index.json)
BUILDERS = {"sd3": (_build_sd3, "StableDiffusion3Pipeline")}
