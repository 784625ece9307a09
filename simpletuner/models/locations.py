"""Where a family's parts are read from, and in which dtype the VAE is loaded."""

from __future__ import annotations

import os

import torch

VAE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def vae_dtype_for(setting: str | None) -> torch.dtype:
    """The VAE's dtype for a vae_dtype value: float32 unless a lower precision is asked for."""
    return VAE_DTYPES.get(setting or "default", torch.float32)


def local_subfolder(location: str, subfolder: str | None) -> str | None:
    """``subfolder`` unless ``location`` is a local folder that holds the component at its root."""
    if subfolder and os.path.isdir(location) and not os.path.isdir(os.path.join(location, subfolder)):
        if os.path.isfile(os.path.join(location, "config.json")):
            return None
    return subfolder
