"""Tiny HiDream-I1 pipeline: four text encoders, the Flux VAE and a mixture-of-experts transformer.

Shapes keep what the HiDream code relies on: two CLIP encoders with projections
(different widths, as CLIP-L and CLIP-G) whose pooled outputs concatenate to the
transformer's ``text_emb_dim``, with more than 128 positions (HiDream's CLIPs are
"long" CLIPs of 248); a T5 encoder; a Llama causal LM whose every layer's hidden
states feed one transformer block each (``llama_layers``); a 16-channel VAE with
scale and shift; and a transformer with one double- and one single-stream block
whose feed-forward layers are a mixture of two routed experts (one picked per
token, so the router's choice matters) plus a shared expert.

The Llama tokenizer is a byte-level BPE (like Llama 3's) over a small word list,
made here with the ``tokenizers`` library; nothing is downloaded.
"""

from __future__ import annotations

from simpletuner.models.tiny.components import clip_text_encoder
from simpletuner.models.tiny.flux import flux_vae
from simpletuner.models.tiny.sd3 import make_t5_tokenizer, t5_encoder
from simpletuner.models.tiny.tokenizer import TOKENIZER_WORDS, _byte_to_unicode, make_tokenizer

CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH, LLAMA_WIDTH = 32, 48, 64, 32
LONG_CLIP_POSITIONS = 248  # HiDream's CLIP encoders read up to 248 tokens
LLAMA_LAYERS = 2
LLAMA_BOS, LLAMA_EOS = "<|begin_of_text|>", "<|end_of_text|>"
# The latent grid the transformer is sized for; HiDreamImagePipeline renders at this area (64 px here).
MAX_LATENT_SIDE = 8
HIDREAM_FULL_SHIFT = 3.0  # the flow shift HiDream-I1-Full samples with


def _byte_level_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Every byte as a token, then merges that make each tiny word (alone and after a space) one token."""
    byte_symbols = list(_byte_to_unicode().values())
    vocab = {symbol: index for index, symbol in enumerate(byte_symbols)}
    space = _byte_to_unicode()[ord(" ")]
    merges: list[tuple[str, str]] = []
    words = list(dict.fromkeys(TOKENIZER_WORDS))
    for form in [space + word for word in words] + words:  # word-start forms first, so they win
        pieces = list(form)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    for special in (LLAMA_BOS, LLAMA_EOS):
        vocab[special] = len(vocab)
    return vocab, merges


def make_llama_tokenizer():
    """A PreTrainedTokenizerFast like Llama 3's: byte-level BPE, no prefix space, <|begin_of_text|> first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _byte_level_vocab_and_merges()
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{LLAMA_BOS} $A", pair=f"{LLAMA_BOS} $A {LLAMA_BOS} $B", special_tokens=[(LLAMA_BOS, vocab[LLAMA_BOS])])
    backend.add_special_tokens([LLAMA_BOS, LLAMA_EOS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=LLAMA_BOS, eos_token=LLAMA_EOS,
                                   model_max_length=131072)


def llama_encoder(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=LLAMA_WIDTH,
        intermediate_size=LLAMA_WIDTH * 2,
        num_hidden_layers=LLAMA_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def hidream_transformer():
    from diffusers import HiDreamImageTransformer2DModel

    blocks = 2  # one double-stream and one single-stream block, each reading one Llama layer
    return HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        caption_channels=[T5_WIDTH, LLAMA_WIDTH],
        text_emb_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
        num_routed_experts=2,
        num_activated_experts=1,
        axes_dims_rope=(8, 4, 4),  # sums to attention_head_dim
        max_resolution=(MAX_LATENT_SIDE, MAX_LATENT_SIDE),
        llama_layers=[index % LLAMA_LAYERS for index in range(blocks)],
    )


def _long_clip(tokenizer, width: int, act: str):
    encoder = clip_text_encoder(tokenizer, width, act, with_projection=True, projection_dim=width,
                                max_positions=LONG_CLIP_POSITIONS)
    tokenizer.model_max_length = LONG_CLIP_POSITIONS
    return encoder


def _build_hidream():
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline

    tokenizer, tokenizer_2 = make_tokenizer(), make_tokenizer(pad_token="!")
    tokenizer_3, tokenizer_4 = make_t5_tokenizer(), make_llama_tokenizer()
    return HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=HIDREAM_FULL_SHIFT),
        vae=flux_vae(),
        text_encoder=_long_clip(tokenizer, CLIP_L_WIDTH, "quick_gelu"),
        tokenizer=tokenizer,
        text_encoder_2=_long_clip(tokenizer_2, CLIP_G_WIDTH, "gelu"),
        tokenizer_2=tokenizer_2,
        text_encoder_3=t5_encoder(tokenizer_3, T5_WIDTH),
        tokenizer_3=tokenizer_3,
        text_encoder_4=llama_encoder(tokenizer_4),
        tokenizer_4=tokenizer_4,
        transformer=hidream_transformer(),
    )


BUILDERS = {"hidream": (_build_hidream, "HiDreamImagePipeline")}
