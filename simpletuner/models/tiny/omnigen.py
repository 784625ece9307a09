"""Tiny OmniGen pipeline: a two-layer OmniGen transformer, the 4-channel 8x VAE and a small tokenizer.

OmniGen has no text encoder; the transformer's own embedding table covers the
tokenizer's vocabulary. The scheduler is configured as the released model's
(invert_sigmas=True, num_train_timesteps=1).
"""

from __future__ import annotations

from simpletuner.models.tiny.components import vae
from simpletuner.models.tiny.sana import make_gemma_tokenizer

HIDDEN = 32
HEADS = 2
# Words of OmniGen's chat template, so it tokenizes to whole-word tokens as a real vocabulary would.
TEMPLATE_WORDS = ("user", "assistant", "diffusion", "end", "Generate", "image", "according", "following",
                  "instructions")


def _transformer(vocab_size: int, pad_token_id: int):
    from diffusers import OmniGenTransformer2DModel

    rotary_pairs = HIDDEN // HEADS // 2  # the rope scaling factors have one entry per rotary pair
    return OmniGenTransformer2DModel(
        in_channels=4,
        patch_size=2,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        intermediate_size=HIDDEN * 2,
        num_layers=2,
        pad_token_id=pad_token_id,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        rope_scaling={"short_factor": [1.0] * rotary_pairs, "long_factor": [1.0] * rotary_pairs},
        pos_embed_max_size=16,  # 128 px images at most (8x VAE, 2x2 patches)
        time_step_dim=32,
    )


def _build_omnigen():
    from diffusers import FlowMatchEulerDiscreteScheduler, OmniGenPipeline

    tokenizer = make_gemma_tokenizer(extra_words=TEMPLATE_WORDS)
    return OmniGenPipeline(
        transformer=_transformer(len(tokenizer), tokenizer.pad_token_id),
        scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True, num_train_timesteps=1),
        vae=vae(0.13025),  # the SDXL VAE's scaling, which OmniGen uses
        tokenizer=tokenizer,
    )


BUILDERS = {"omnigen": (_build_omnigen, "OmniGenPipeline")}
