"""A tiny Flux pipeline: the real FluxTransformer2DModel, a 16-channel 8x VAE, CLIP-L and T5 stand-ins.

Shapes keep what the Flux code relies on: latents have 16 channels and are
packed 2x2 into 64-wide tokens; the transformer has guidance embeddings (like
dev/krea), one double-stream and two single-stream blocks; CLIP gives the
pooled vector and T5 the token sequence. The T5 tokenizer is a small unigram
vocabulary built here (whole words plus single letters), so nothing is downloaded.
"""

from __future__ import annotations

from simpletuner.models.tiny.components import clip_text_encoder
from simpletuner.models.tiny.tokenizer import TOKENIZER_WORDS, make_tokenizer

LATENT_CHANNELS = 16
HIDDEN = 32  # T5 width, CLIP width and the transformer's inner width
T5_MAX_LENGTH = 512
# The real Flux VAE's latent statistics.
VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def make_t5_tokenizer():
    """A T5 tokenizer over a tiny unigram vocabulary: pad, eos, unk, the common words, then letters."""
    from transformers import T5TokenizerFast

    word_start = "\u2581"  # sentencepiece's marker for "a word begins here"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(word_start + word, -1.0) for word in dict.fromkeys(TOKENIZER_WORDS)]
    vocab.append((word_start, -2.0))
    vocab += [(character, -5.0) for character in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=HIDDEN,
        d_kv=8,
        d_ff=HIDDEN * 2,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as Flux's T5-XXL
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def flux_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # three downsamples: 8x
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=VAE_SCALING_FACTOR,
        shift_factor=VAE_SHIFT_FACTOR,
        use_quant_conv=False,  # the Flux VAE has no quant convolutions
        use_post_quant_conv=False,
    )


def flux_transformer(guidance_embeds: bool = True):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,  # 2x2 packed latents
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=HIDDEN,
        pooled_projection_dim=HIDDEN,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )


def _build_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    tokenizer = make_tokenizer()
    tokenizer_2 = make_t5_tokenizer()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=flux_vae(),
        text_encoder=clip_text_encoder(tokenizer, HIDDEN, "quick_gelu", with_projection=False),
        tokenizer=tokenizer,
        text_encoder_2=t5_encoder(tokenizer_2),
        tokenizer_2=tokenizer_2,
        transformer=flux_transformer(),
    )


# family -> (builder, pipeline class name written in model_index.json)
BUILDERS = {"flux": (_build_flux, "FluxPipeline")}
