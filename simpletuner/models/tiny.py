"""Tiny random-weight pipelines, saved in diffusers layout.

Tests and the demo need a real model folder without downloading one. These
builders construct the same diffusers/transformers classes the real models
use, with a few thousand parameters each, and save them with
``save_pretrained`` so that everything downstream loads them through the
ordinary ``from_pretrained`` path.

The shapes keep the properties code relies on: the VAE downsamples by 8
(four encoder blocks), latents have 4 channels, CLIP runs 77 positions, SDXL
has two text encoders with pooled output and text-time micro-conditioning,
and each scheduler is the class (and prediction type) the real model ships.

    python -m simpletuner.models.tiny --family sdxl --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from typing import Callable

# Words the tiny tokenizer knows as whole tokens; everything else falls back to bytes.
TOKENIZER_WORDS = (
    "a an the of on in with and photo image picture background "
    "red green blue yellow orange purple pink white black grey gray brown cyan magenta "
    "circle square triangle stripes striped shape shapes small large big "
    "horizontal vertical diagonal plain bright dark"
).split()

CLIP_MAX_LENGTH = 77
SUPPORTED_FAMILIES = ("sd1x", "sd2x", "sdxl")


# --------------------------------------------------------------------------- tokenizer

def _byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table byte-level BPE uses.

    Printable Latin-1 bytes map to themselves; the rest are shifted past 255
    so that every byte has a visible, non-whitespace character.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    table: dict[int, str] = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _tiny_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A CLIP-style BPE vocabulary: every byte (alone and word-final) plus a few whole words."""
    symbols = list(_byte_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in dict.fromkeys(TOKENIZER_WORDS):
        # Merge left to right: "red" -> "r e", "re d</w>" gives the token "red</w>".
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = f"{pieces[0]} {pieces[1]}"
            joined = pieces[0] + pieces[1]
            if pair not in merges:
                merges.append(pair)
            if joined not in tokens:
                tokens.append(joined)
            pieces = [joined] + pieces[2:]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_vocab_files(folder: str) -> None:
    """Write the tiny vocab.json and merges.txt (the files a CLIP tokenizer is read from)."""
    vocab, merges = _tiny_vocab_and_merges()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as handle:
        json.dump(vocab, handle)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def make_tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer read from the tiny vocab files, padding to CLIP's 77 positions."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_vocab_files(folder)
        return CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)


# --------------------------------------------------------------------------- components

def _text_encoder(tokenizer, hidden: int, act: str, with_projection: bool, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,  # SDXL reads the penultimate hidden state
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act=act,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def _vae(scaling_factor: float):
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


def _sd_unet(cross_attention_dim: int, linear_projection: bool):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        use_linear_projection=linear_projection,
    )


def _sdxl_unet(cross_attention_dim: int, pooled_dim: int):
    from diffusers import UNet2DConditionModel

    time_embed_dim = 8
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # pooled text embedding + six size numbers, each given a sinusoidal embedding
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_embed_dim,
    )


_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


# --------------------------------------------------------------------------- pipelines

def _build_sd1x():
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tokenizer = make_tokenizer()
    scheduler = PNDMScheduler(**_SD_BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    return StableDiffusionPipeline(
        vae=_vae(0.18215),
        text_encoder=_text_encoder(tokenizer, 32, "quick_gelu", with_projection=False),
        tokenizer=tokenizer,
        unet=_sd_unet(cross_attention_dim=32, linear_projection=False),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sd2x():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer = make_tokenizer(pad_token="!")  # OpenCLIP pads with "!" (id 0 in the real vocab)
    scheduler = DDIMScheduler(
        **_SD_BETAS, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=_vae(0.18215),
        text_encoder=_text_encoder(tokenizer, 48, "gelu", with_projection=False),
        tokenizer=tokenizer,
        unet=_sd_unet(cross_attention_dim=48, linear_projection=True),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer = make_tokenizer()
    tokenizer_2 = make_tokenizer(pad_token="!")
    text_encoder = _text_encoder(tokenizer, 32, "quick_gelu", with_projection=False)
    # Different widths, as in the real model (768 / 1280): single-file loading tells the encoders apart by width.
    text_encoder_2 = _text_encoder(tokenizer_2, 48, "gelu", with_projection=True, projection_dim=48)
    scheduler = EulerDiscreteScheduler(**_SD_BETAS, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=_vae(0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_sdxl_unet(cross_attention_dim=32 + 48, pooled_dim=48),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


_BUILDERS: dict[str, Callable] = {"sd1x": _build_sd1x, "sd2x": _build_sd2x, "sdxl": _build_sdxl}
_PIPELINE_NAMES = {"sd1x": "StableDiffusionPipeline", "sd2x": "StableDiffusionPipeline",
                   "sdxl": "StableDiffusionXLPipeline"}


def existing_model(family: str, out_dir: str) -> bool:
    """True when ``out_dir`` already holds a model of this family's pipeline class.

    Raises FileExistsError when it holds something else, so nothing is overwritten.
    """
    index_path = os.path.join(out_dir, "model_index.json")
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as handle:
            found = json.load(handle).get("_class_name")
        if found != _PIPELINE_NAMES[family]:
            raise FileExistsError(
                f"{out_dir} holds a {found} model, not a tiny {family} one; remove it or pick another folder"
            )
        return True
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} is not empty and holds no model; remove it or pick another output folder")
    return False


def build_tiny(family: str, out_dir: str, seed: int = 0) -> str:
    """Build the tiny pipeline for ``family`` with random weights and save it to ``out_dir``.

    A folder that already holds this family's pipeline is kept as it is (so
    demo runs reuse it). The model is written under a temporary name and
    renamed into place, so a crash never leaves a half-written model that
    looks complete. Returns ``out_dir``.
    """
    if family not in _BUILDERS:
        raise ValueError(f"no tiny model for family {family!r}; choose one of: {', '.join(SUPPORTED_FAMILIES)}")
    if existing_model(family, out_dir):
        return out_dir
    import torch  # here, so the command line answers "already built" without loading torch

    torch.manual_seed(seed)
    pipeline = _BUILDERS[family]()
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):
            if os.path.isdir(os.path.join(staging, name)):
                # Also keep the plain vocabulary files, which every CLIPTokenizer version can read.
                write_vocab_files(os.path.join(staging, name))
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.replace(staging, out_dir)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a tiny random-weight pipeline in diffusers layout.")
    parser.add_argument("--family", required=True, choices=SUPPORTED_FAMILIES)
    parser.add_argument("--out", required=True, help="output folder (skipped when it already holds model_index.json)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if existing_model(args.family, args.out):
        print(f"{args.out} already holds a tiny {args.family} model; nothing to do")
        return 0
    build_tiny(args.family, args.out, seed=args.seed)
    print(f"tiny {args.family} pipeline written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
