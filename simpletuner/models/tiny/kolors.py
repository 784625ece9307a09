"""Tiny Kolors pipeline: an SDXL-shaped UNet conditioned on a small ChatGLM3 encoder.

What Kolors code relies on is kept: the tokenizer is diffusers' ChatGLMTokenizer
over a real SentencePiece model (trained here, in memory, on the tiny word
list), so it pads on the left and prefixes ``[gMASK] sop`` like ChatGLM3; the
encoder has at least two layers (the pipeline reads the penultimate hidden
state and the last token of the final one), multi-query attention and 256
rotary positions; the UNet projects the encoder width to its cross-attention
width (``encoder_hid_proj``) and takes the pooled text plus six size numbers;
the scheduler is Kolors' Euler schedule over 1100 training steps.
"""

from __future__ import annotations

import io
import os
import shutil
import string
import tempfile
import weakref

from simpletuner.models.tiny.components import vae
from simpletuner.models.tiny.tokenizer import TOKENIZER_WORDS
from simpletuner.models.tiny.unet_families import sdxl_unet

CHATGLM_WIDTH = 32
KOLORS_POSITIONS = 256  # KolorsPipeline always encodes 256 tokens
SENTENCEPIECE_VOCAB = 512  # 256 byte fallbacks, the characters, and merges up to the whole tiny words
SDXL_VAE_SCALING = 0.13025


def _sentencepiece_model() -> bytes:
    """A BPE SentencePiece model (unk 0, bos 1, eos 2, as ChatGLM3's) trained on the tiny words; deterministic."""
    import sentencepiece

    words = list(dict.fromkeys(TOKENIZER_WORDS))
    corpus = [" ".join(words), string.ascii_letters + string.digits + string.punctuation] + words * 4
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=SENTENCEPIECE_VOCAB,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def make_chatglm_tokenizer():
    """diffusers' ChatGLMTokenizer over the tiny SentencePiece model.

    The tokenizer reads its model file again when saved, so the file lives in a
    temporary folder that is removed when the tokenizer is garbage collected.
    """
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    folder = tempfile.mkdtemp(prefix="tiny-chatglm-")
    path = os.path.join(folder, "tokenizer.model")
    with open(path, "wb") as handle:
        handle.write(_sentencepiece_model())
    tokenizer = ChatGLMTokenizer(vocab_file=path)
    weakref.finalize(tokenizer, shutil.rmtree, folder, True)
    return tokenizer


def chatglm_encoder(tokenizer, width: int = CHATGLM_WIDTH):
    """A two-layer ChatGLM3 (multi-query attention with two groups, RMSNorm, original rope)."""
    import torch
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, RMSNorm

    config = ChatGLMConfig(
        num_layers=2,
        padded_vocab_size=tokenizer.vocab_size,  # the SentencePiece pieces plus ChatGLM's special tokens
        hidden_size=width,
        ffn_hidden_size=width * 2,
        kv_channels=8,
        num_attention_heads=width // 8,
        seq_length=KOLORS_POSITIONS,
        multi_query_attention=True,
        multi_query_group_num=2,
        add_qkv_bias=True,
        original_rope=True,
    )
    encoder = ChatGLMModel(config, empty_init=False)
    with torch.no_grad():  # ChatGLM's RMSNorm allocates its weight uninitialised; loading normally fills it
        for module in encoder.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
    return encoder.eval()


def _build_kolors():
    from diffusers import EulerDiscreteScheduler, KolorsPipeline

    tokenizer = make_chatglm_tokenizer()
    # Kolors' own schedule: scaled-linear betas ending at 0.014, over 1100 training timesteps.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.014, beta_schedule="scaled_linear",
                                       num_train_timesteps=1100, steps_offset=1, timestep_spacing="leading")
    return KolorsPipeline(
        vae=vae(SDXL_VAE_SCALING),
        text_encoder=chatglm_encoder(tokenizer),
        tokenizer=tokenizer,
        # Kolors projects ChatGLM's 4096 wide states to 2048 (text_proj); here 32 -> 48.
        unet=sdxl_unet(cross_attention_dim=48, pooled_dim=CHATGLM_WIDTH, encoder_hid_dim=CHATGLM_WIDTH,
                       encoder_hid_dim_type="text_proj"),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=False,
    )


BUILDERS = {"kolors": (_build_kolors, "KolorsPipeline")}
