"""Diffusers state dicts written back in the original (Stability) single-file layout, for single-file and
GGUF loading tests: the inverse of the key conversion diffusers applies when it reads such files."""

from __future__ import annotations

import re

import torch

SD3_TOP_LEVEL = {
    "pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
}
SD3_BLOCK = {
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k", "attn.to_out.0": "x_block.attn.proj",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn.to_add_out": "context_block.attn.proj", "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k", "attn2.to_out.0": "x_block.attn2.proj",
    "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
}
# diffusers q/k/v names (with {} for q, k, v) -> the fused qkv of the original layout
SD3_FUSED = {"attn.to_{}": "x_block.attn.qkv", "attn.add_{}_proj": "context_block.attn.qkv",
             "attn2.to_{}": "x_block.attn2.qkv"}


def swap_halves(tensor):
    """The original final norms order (shift, scale); diffusers uses (scale, shift)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def sd3_transformer_to_original(state: dict, num_layers: int) -> dict:
    """Diffusers SD3Transformer2DModel keys -> 'model.diffusion_model.' MMDiT keys (the inverse of diffusers')."""
    out = {}
    for key, value in state.items():
        stem, _, param = key.rpartition(".")
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = value
        elif stem in SD3_TOP_LEVEL:
            out[f"{SD3_TOP_LEVEL[stem]}.{param}"] = value
        elif stem == "norm_out.linear":
            out[f"final_layer.adaLN_modulation.1.{param}"] = swap_halves(value)
        elif (m := re.match(r"transformer_blocks\.(\d+)\.(.*)", stem)) and m[2] in SD3_BLOCK:
            last_context_norm = m[2] == "norm1_context.linear" and int(m[1]) == num_layers - 1
            out[f"joint_blocks.{m[1]}.{SD3_BLOCK[m[2]]}.{param}"] = swap_halves(value) if last_context_norm else value
    for block in range(num_layers):
        for pattern, target in SD3_FUSED.items():
            for param in ("weight", "bias"):
                names = [f"transformer_blocks.{block}.{pattern.format(p)}.{param}" for p in "qkv"]
                if names[0] in state:
                    out[f"joint_blocks.{block}.{target}.{param}"] = torch.cat([state[n] for n in names])
    return {f"model.diffusion_model.{key}": value for key, value in out.items()}


def vae_to_original(state: dict, up_blocks: int) -> dict:
    """Diffusers AutoencoderKL keys -> 'first_stage_model.' keys (down/mid/up blocks, 1x1-conv attention)."""
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    patterns = [
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(.*)", lambda m: f"encoder.down.{m[1]}.block.{m[2]}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", lambda m: f"encoder.down.{m[1]}.downsample.{m[2]}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(.*)", lambda m: f"decoder.up.{up_blocks - 1 - int(m[1])}.block.{m[2]}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)",
         lambda m: f"decoder.up.{up_blocks - 1 - int(m[1])}.upsample.{m[2]}"),
    ]
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{attention[m[2]]}.{m[3]}"
            value = value[:, :, None, None] if value.ndim == 2 else value
        else:
            for pattern, rename in patterns:
                if m := re.match(pattern, new):
                    new = rename(m)
                    break
        out["first_stage_model." + new] = value
    return out
