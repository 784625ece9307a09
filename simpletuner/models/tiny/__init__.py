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

Each family's builder lives in a module of this package that defines BUILDERS
(family -> (build function, pipeline class name)); TINY_MODULES says which.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import tempfile

from simpletuner.models.tiny.tokenizer import make_tokenizer, write_vocab_files

# family -> module defining its builder
TINY_MODULES = {
    "sd1x": "simpletuner.models.tiny.unet_families",
    "sd2x": "simpletuner.models.tiny.unet_families",
    "sdxl": "simpletuner.models.tiny.unet_families",
    "kolors": "simpletuner.models.tiny.kolors",
    "pixart_sigma": "simpletuner.models.tiny.pixart",
    "sana": "simpletuner.models.tiny.sana",
    "lumina2": "simpletuner.models.tiny.lumina2",
    "flux": "simpletuner.models.tiny.flux",
    "sd3": "simpletuner.models.tiny.sd3",
    "auraflow": "simpletuner.models.tiny.auraflow",
    "deepfloyd": "simpletuner.models.tiny.deepfloyd",
    "qwen_image": "simpletuner.models.tiny.qwen_image",
    "hidream": "simpletuner.models.tiny.hidream",
    "wan": "simpletuner.models.tiny.wan",
    "ltxvideo": "simpletuner.models.tiny.ltxvideo",
}
SUPPORTED_FAMILIES = tuple(TINY_MODULES)

__all__ = ["build_tiny", "existing_model", "make_tokenizer", "main", "SUPPORTED_FAMILIES"]


def _builder(family: str):
    if family not in TINY_MODULES:
        raise ValueError(f"no tiny model for family {family!r}; choose one of: {', '.join(SUPPORTED_FAMILIES)}")
    return importlib.import_module(TINY_MODULES[family]).BUILDERS[family]


def existing_model(family: str, out_dir: str) -> bool:
    """True when ``out_dir`` already holds a model of this family's pipeline class.

    Raises FileExistsError when it holds something else, so nothing is overwritten.
    """
    index_path = os.path.join(out_dir, "model_index.json")
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as handle:
            found = json.load(handle).get("_class_name")
        if found != _builder(family)[1]:
            raise FileExistsError(
                f"{out_dir} holds a {found} model, not a tiny {family} one; remove it or pick another folder"
            )
        return True
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} is not empty and holds no model; remove it or pick another output folder")
    return False


def _is_clip_tokenizer(folder: str) -> bool:
    config = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(config):
        return False
    with open(config, encoding="utf-8") as handle:
        return "CLIP" in str(json.load(handle).get("tokenizer_class", ""))


def build_tiny(family: str, out_dir: str, seed: int = 0) -> str:
    """Build the tiny pipeline for ``family`` with random weights and save it to ``out_dir``.

    A folder that already holds this family's pipeline is kept as it is (so
    demo runs reuse it). The model is written under a temporary name and
    renamed into place, so a crash never leaves a half-written model that
    looks complete. Returns ``out_dir``.
    """
    build = _builder(family)[0]
    if existing_model(family, out_dir):
        return out_dir
    import torch  # here, so the command line answers "already built" without loading torch

    torch.manual_seed(seed)
    pipeline = build()
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):
            if _is_clip_tokenizer(os.path.join(staging, name)):
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
