"""Tiny Qwen-Image pipeline: a Qwen2.5-VL encoder, the Wan-style 3D causal VAE, the Qwen-Image MMDiT.

What the Qwen-Image code relies on is kept: QwenImagePipeline wraps every
prompt in a chat template and drops the first ``prompt_template_encode_start_idx``
(34) tokens of the encoder's output, the system prompt. That count is right
only for a vocabulary where the template's words are single tokens, as in
Qwen's real one, so the tiny byte-level BPE tokenizer knows every word of the
template (and the sample captions) whole: the system prefix is 34 tokens here too.
The VAE downsamples 8x into 16 latent channels with per-channel mean and std,
the transformer packs 2x2 latent patches into 64-wide tokens, and the scheduler
has Qwen-Image's resolution-dependent (dynamic, exponential) shift.
"""

from __future__ import annotations

import re

from simpletuner.models.tiny.tokenizer import TOKENIZER_WORDS

HIDDEN = 32  # the text encoder's width (the transformer's joint_attention_dim)
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
END_OF_TEXT = "<|endoftext|>"  # Qwen's pad token
WORD_START = "\u0120"  # how byte-level BPE spells a leading space ("Ġ")
# Qwen-Image's shipped scheduler settings.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}


def prompt_template() -> str:
    """The chat template QwenImagePipeline wraps prompts in, read from the pipeline (not copied)."""
    from diffusers import QwenImagePipeline

    empty = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    return empty.prompt_template_encode


def template_words(template: str) -> list[str]:
    """The words of the template outside its chat tokens, in order, each once."""
    for token in CHAT_TOKENS:
        template = template.replace(token, " ")
    return list(dict.fromkeys(re.findall(r"[^\W\d_]+", template)))


def _merged(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """``pieces`` after byte-pair encoding: repeatedly join the adjacent pair with the lowest merge rank."""
    while len(pieces) > 1:
        pairs = [(ranks.get(pair), index) for index, pair in enumerate(zip(pieces, pieces[1:]))]
        candidates = [(rank, index) for rank, index in pairs if rank is not None]
        if not candidates:
            break
        _, index = min(candidates)
        pieces = pieces[:index] + [pieces[index] + pieces[index + 1]] + pieces[index + 2:]
    return pieces


def _vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE: <|endoftext|>, the 256 byte symbols, and merges that make each word one token.

    BPE applies the lowest-ranked merge first, so one word's merges can split another's: each word
    is encoded with the merges made so far and its remaining pieces are joined by new, later merges.
    """
    from tokenizers import pre_tokenizers

    vocab = {END_OF_TEXT: 0}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for form in [WORD_START + word for word in words] + words:
        pieces = _merged(list(form), ranks)
        while len(pieces) > 1:
            ranks.setdefault((pieces[0], pieces[1]), len(ranks))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    return vocab, sorted(ranks, key=ranks.get)


def make_qwen_tokenizer():
    """A Qwen2Tokenizer (byte-level BPE, pads on the right with <|endoftext|>) over a small vocabulary."""
    from transformers import Qwen2Tokenizer

    words = list(dict.fromkeys([*template_words(prompt_template()), *TOKENIZER_WORDS]))
    vocab, merges = _vocab_and_merges(words)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=list(CHAT_TOKENS),
                          padding_side="right")


def qwen_text_encoder(tokenizer):
    """A two-layer Qwen2.5-VL (with a one-block vision tower, which text prompts never reach)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocabulary = len(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocabulary, "hidden_size": HIDDEN, "intermediate_size": HIDDEN * 2,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            # Multimodal rotary sections (time, height, width) add up to half the head size (32 wide / 2 heads / 2).
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": HIDDEN, "fullatt_block_indexes": [0]},
        # Image/video token ids past the vocabulary: text prompts never contain them.
        image_token_id=vocabulary, video_token_id=vocabulary + 1,
        vision_start_token_id=vocabulary + 2, vision_end_token_id=vocabulary + 3,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _vae():
    from diffusers import AutoencoderKLQwenImage

    # Three downsampling stages (8x); 16 latent channels with Qwen-Image's default mean and std.
    return AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                  temperal_downsample=[False, True, True])


def _transformer():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels x 2x2 patch
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=HIDDEN,
        axes_dims_rope=(4, 6, 6),  # sums to the head size
    )


def _build_qwen_image():
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    tokenizer = make_qwen_tokenizer()
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=_vae(),
        text_encoder=qwen_text_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=_transformer(),
    )


BUILDERS = {"qwen_image": (_build_qwen_image, "QwenImagePipeline")}
