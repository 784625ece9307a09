"""Base-model benchmark images, rendered once and shown beside every later validation image.

They live in ``output_dir/benchmarks/`` with a manifest holding a fingerprint
of everything that shapes them (model, prompts, sizes, seed, sampler
settings). A later run with the same fingerprint reuses them; a changed one
renders them again while base weights are available (see
``weights.base_weights``).
"""

from __future__ import annotations

import hashlib
import json
import os

from PIL import Image

from simpletuner.validation.images import RenderKey, save_png
from simpletuner.validation.prompts import ValidationPrompt

BENCHMARK_FOLDER = "benchmarks"
MANIFEST = "benchmark.json"

# Settings that change what a benchmark image looks like.
RENDER_SETTINGS = ("model_family", "model_flavour", "pretrained_model_name_or_path", "pretrained_vae_model_name_or_path",
                   "validation_num_inference_steps", "validation_guidance", "validation_guidance_rescale",
                   "validation_guidance_real", "validation_guidance_skip_layers", "validation_guidance_skip_scale",
                   "validation_guidance_skip_layers_start", "validation_guidance_skip_layers_stop",
                   "validation_negative_prompt", "validation_noise_scheduler", "validation_seed_source",
                   "validation_no_cfg_until_timestep", "prediction_type", "mixed_precision")


def fingerprint(settings, prompts: list[ValidationPrompt], keys: list[RenderKey], seed: int,
                control_source: str | None = None) -> str:
    """``control_source``: a ControlNet run's validation control image (``control.ControlImage.source``)."""
    identity = {
        "settings": {name: getattr(settings, name) for name in RENDER_SETTINGS},
        "prompts": [[p.shortname, p.text, p.input_source] if p.input_source else [p.shortname, p.text]
                    for p in prompts],
        "keys": [[k.shortname, k.width, k.height, k.index] for k in keys],
        "seed": seed,
    }
    if control_source is not None:  # only then, so other runs keep their stored benchmarks
        identity["controlnet"] = {"control_image": control_source, "model": settings.controlnet_model_name_or_path,
                                  "custom_config": settings.controlnet_custom_config}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _file_name(prompt_slug: str, key: RenderKey) -> str:
    return f"base_{prompt_slug}_{key.size_label}_{key.index}.png"


class Benchmark:
    def __init__(self, output_dir: str, fingerprint_value: str):
        self.folder = os.path.join(output_dir, BENCHMARK_FOLDER)
        self.fingerprint = fingerprint_value
        self.images: dict[RenderKey, Image.Image] = {}

    def load(self, prompts: dict[str, ValidationPrompt], keys: list[RenderKey]) -> bool:
        """Read the stored images when their fingerprint matches and every one exists."""
        path = os.path.join(self.folder, MANIFEST)
        if not os.path.isfile(path):
            return False
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        if manifest.get("fingerprint") != self.fingerprint:
            return False
        files = {key: os.path.join(self.folder, _file_name(prompts[key.shortname].slug, key)) for key in keys}
        if not all(os.path.isfile(file) for file in files.values()):
            return False
        for key, file in files.items():
            with Image.open(file) as image:
                self.images[key] = image.convert("RGB")
        return True

    def save(self, prompts: dict[str, ValidationPrompt], images: dict[RenderKey, Image.Image]) -> None:
        """Store ``images``; the manifest is written last, so an interrupted save is never reused."""
        for key, image in images.items():
            save_png(image, self.folder, _file_name(prompts[key.shortname].slug, key))
        staging = os.path.join(self.folder, f".{MANIFEST}.tmp")
        with open(staging, "w", encoding="utf-8") as handle:
            json.dump({"fingerprint": self.fingerprint, "images": len(images)}, handle)
        os.replace(staging, os.path.join(self.folder, MANIFEST))
        self.images = dict(images)

    def beside(self, key: RenderKey) -> Image.Image | None:
        return self.images.get(key)
