"""Tiny Sana pipeline: Gemma 2 encoder, deep-compression autoencoder (32x), linear-attention transformer.

``make_gemma_tokenizer`` and ``gemma2_encoder`` are shared with the tiny
Lumina 2 pipeline (both condition on Gemma 2).
"""

from __future__ import annotations

import string

from simpletuner.models.tiny.tokenizer import TOKENIZER_WORDS

GEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # ids 0-4, as in Gemma's vocabulary
_CHARACTERS = string.ascii_letters + string.digits + string.punctuation
WORD_START = "▁"
# Sana prepends a long instruction to every prompt, so the encoder must take long inputs.
GEMMA_MAX_POSITIONS = 4096


def words_of(text: str) -> list[str]:
    """The words of ``text`` without surrounding punctuation, in order, each once."""
    stripped = (word.strip(string.punctuation) for word in text.split())
    return list(dict.fromkeys(word for word in stripped if word))


def _gemma_vocab_and_merges(extra_words: tuple[str, ...] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-fallback BPE: special tokens, the 256 byte tokens, characters, and merges to known words.

    Merges for the word-start forms ("▁red") come first, so a word after a
    space becomes one token rather than "▁" + "red".
    """
    vocab = {token: index for index, token in enumerate(GEMMA_SPECIAL_TOKENS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for character in WORD_START + _CHARACTERS:
        vocab.setdefault(character, len(vocab))
    words = list(dict.fromkeys([*TOKENIZER_WORDS, *extra_words]))
    merges: list[tuple[str, str]] = []
    for form in [WORD_START + word for word in words] + words:
        pieces = list(form)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            joined = pieces[0] + pieces[1]
            vocab.setdefault(joined, len(vocab))
            pieces = [joined] + pieces[2:]
    return vocab, merges


def make_gemma_tokenizer(model_max_length: int = GEMMA_MAX_POSITIONS, extra_words: tuple[str, ...] = ()):
    """A GemmaTokenizer (BPE with byte fallback, adds <bos>, pads on the right) over a small vocabulary.

    ``extra_words`` become single tokens too (as a real vocabulary would have them).
    """
    from transformers import GemmaTokenizer

    vocab, merges = _gemma_vocab_and_merges(tuple(extra_words))
    return GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, add_bos_token=True,
                          padding_side="right")


def gemma2_encoder(tokenizer, hidden: int = 32):
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,  # Lumina 2 reads the penultimate hidden state
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        max_position_embeddings=GEMMA_MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Gemma2Model(config).eval()


def _autoencoder_dc():
    from diffusers import AutoencoderDC

    stages = 6  # five downsamples: 32x, as Sana's DC-AE
    return AutoencoderDC(
        in_channels=3,
        latent_channels=32,
        attention_head_dim=8,
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        encoder_block_out_channels=(8, 8, 16, 16, 32, 32),  # the deepest width must reach the latent width
        decoder_block_out_channels=(8, 8, 16, 16, 32, 32),
        encoder_layers_per_block=(1,) * stages,
        decoder_layers_per_block=(1,) * stages,
        encoder_qkv_multiscales=((),) * stages,
        decoder_qkv_multiscales=((),) * stages,
        scaling_factor=0.41407,  # DC-AE f32c32's latent scale
    )


def _transformer(caption_channels: int):
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(
        in_channels=32,
        out_channels=32,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=caption_channels,
        sample_size=16,  # one of the sizes SanaPipeline has an aspect-ratio table for (512px)
        patch_size=1,
    )


def _build_sana():
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    from simpletuner.models.sana import default_complex_human_instruction

    # The words of the instruction Sana prepends are whole tokens, which keeps the encoded prompts short.
    tokenizer = make_gemma_tokenizer(extra_words=tuple(words_of(" ".join(default_complex_human_instruction()))))
    text_encoder = gemma2_encoder(tokenizer)
    # Sana ships a flow-matching DPM-Solver for inference; training uses the flow-matching objective.
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
    )
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_autoencoder_dc(),
        transformer=_transformer(caption_channels=text_encoder.config.hidden_size),
        scheduler=scheduler,
    )


BUILDERS = {"sana": (_build_sana, "SanaPipeline")}
