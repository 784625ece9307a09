"""Saving a transformer family's LoRA with its pipeline's save_lora_weights, atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import torch

LORA_FILE = "pytorch_lora_weights.safetensors"


def save_transformer_lora(family, output_dir: str, denoiser_lora_state: dict[str, torch.Tensor],
                          text_encoder_lora_states: dict[str, dict[str, torch.Tensor]] | None = None,
                          adapter_metadata: dict[str, dict] | None = None) -> None:
    """Write output_dir/pytorch_lora_weights.safetensors for a family whose only LoRA is on the transformer.

    Written in a temporary folder inside ``output_dir`` and renamed into place, so a crash never leaves a
    partial file.
    """
    if text_encoder_lora_states:
        raise ValueError(f"{family.name} trains no text encoder LoRA; got states for "
                         f"{sorted(text_encoder_lora_states)}")
    metadata = adapter_metadata or {}
    unknown = set(metadata) - {"transformer"}
    if unknown:
        raise ValueError(f"{family.name} has no component(s) {sorted(unknown)}; only 'transformer' takes a LoRA")
    arguments: dict[str, Any] = {"transformer_lora_layers": denoiser_lora_state}
    if "transformer" in metadata:
        arguments["transformer_lora_adapter_metadata"] = metadata["transformer"]
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".lora-", dir=output_dir)
    try:
        family.pipeline_class.save_lora_weights(staging, weight_name=LORA_FILE, safe_serialization=True, **arguments)
        os.replace(os.path.join(staging, LORA_FILE), os.path.join(output_dir, LORA_FILE))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
