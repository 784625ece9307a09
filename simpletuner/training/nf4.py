"""nf4-bnb after loading: every Linear layer of a frozen module becomes a bitsandbytes ``Linear4bit``.

The weights are cut into blocks of 64, each stored as 4-bit indices into the NF4 table plus one
(double-quantised) scale, and dequantised on the fly in each forward, computing in the dtype the
layer had. Convolutions, norms and embeddings keep their precision (bitsandbytes has no 4-bit
kernels for them), as do the layers a model keeps in float32 on purpose (``_keep_in_fp32_modules``,
e.g. T5's ``wo``).

The module is marked ``is_loaded_in_4bit`` as diffusers' and transformers' bitsandbytes loaders
mark theirs, which is how PEFT picks its bitsandbytes LoRA layer for the wrapped Linear4bit.
"""

from __future__ import annotations

import torch

NF4_BLOCK_SIZE = 64
PACKED_CPU_ROWS = 32  # bitsandbytes' packed CPU kernel takes output rows in groups of this many


def quantize_to_nf4(module: torch.nn.Module, device: torch.device) -> int:
    """Swap ``module``'s Linear layers for frozen NF4 Linear4bit layers quantised on ``device``; returns how many."""
    kept = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    targets = [(name, layer) for name, layer in module.named_modules()
               if type(layer) is torch.nn.Linear and not _is_kept(name, kept)]
    for name, layer in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child_name, nf4_linear(layer, device))
    module.is_loaded_in_4bit = True
    limit_packed_cpu_kernel(module)
    return len(targets)


def limit_packed_cpu_kernel(module: torch.nn.Module) -> None:
    """Keep bitsandbytes' repacked CPU kernel to the layer shapes it handles.

    On CPUs with AVX512-BF16, a Linear4bit repacks its weight for a faster kernel the first time it runs
    in inference mode; the repacking needs in_features to be a multiple of the block size and
    out_features a multiple of 32, and fails on other layers, which therefore keep the plain kernel.
    """
    import bitsandbytes as bnb

    for layer in module.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            blocksize = getattr(layer.weight, "blocksize", NF4_BLOCK_SIZE)
            if layer.in_features % blocksize or layer.out_features % PACKED_CPU_ROWS:
                layer.support_avx512bf16_for_cpu = False


def _is_kept(name: str, kept: tuple[str, ...]) -> bool:
    parts = name.split(".")
    return any(keep in parts or name.endswith(keep) for keep in kept)


def nf4_linear(layer: torch.nn.Linear, device: torch.device):
    """A frozen bitsandbytes Linear4bit computing what ``layer`` computes, its weight stored as NF4 on ``device``."""
    import bitsandbytes as bnb

    dtype = layer.weight.dtype
    replacement = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                    compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                    device="meta")
    weight = bnb.nn.Params4bit(layer.weight.data.to(device), requires_grad=False, blocksize=NF4_BLOCK_SIZE,
                               compress_statistics=True, quant_type="nf4", module=replacement)
    replacement.weight = weight.to(device)  # Params4bit quantises when it is first moved to a device
    if layer.bias is not None:
        replacement.bias = torch.nn.Parameter(layer.bias.data.to(device), requires_grad=False)
    replacement.requires_grad_(False)
    return replacement
