"""Writing a diffusers model's weights into a GGUF file, as the published quantised checkpoints are.

Two-dimensional weights whose rows split into Q8_0 blocks (32 values) are stored as Q8_0; every other
tensor stays F32, which diffusers' GGUF loader reads as a plain tensor. Keys keep diffusers' names, which
diffusers' single-file loader accepts without conversion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

Q8_0_BLOCK = 32


def write_gguf(state_dict: dict[str, torch.Tensor], path: Path, architecture: str) -> dict[str, str]:
    """Write ``state_dict`` to ``path``; returns name -> the GGUF type it was stored as."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    writer = GGUFWriter(str(path), arch=architecture)
    stored = {}
    for name, tensor in state_dict.items():
        values = tensor.detach().float().cpu().numpy()
        if values.ndim == 2 and values.shape[-1] % Q8_0_BLOCK == 0:
            writer.add_tensor(name, quantize(values, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
            stored[name] = "Q8_0"
        else:
            writer.add_tensor(name, values.astype(np.float32))
            stored[name] = "F32"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def transformer_to_gguf(model_dir: str, model_class, path: Path, architecture: str) -> dict[str, str]:
    """The transformer of the diffusers folder ``model_dir``, written to ``path`` as GGUF."""
    transformer = model_class.from_pretrained(model_dir, subfolder="transformer")
    return write_gguf(transformer.state_dict(), path, architecture)
