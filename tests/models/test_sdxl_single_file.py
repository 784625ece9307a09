"""SDXL from a single original-layout (.safetensors) checkpoint, with the architecture from a local folder.

Real single-file SDXL checkpoints use the original Stability key names. The
helpers below rename a tiny diffusers UNet and VAE into that layout (the
inverse of diffusers' own conversion) so the loader is exercised offline.
"""

import re

import pytest
import torch
from safetensors.torch import save_file

from simpletuner.config.settings import Settings
from simpletuner.models.sdxl import StableDiffusionXL

RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
UNET_TOP_LEVEL = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                  "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
                  "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    first, _, tail = rest.partition(".")
    return f"{RESNET_NAMES.get(first, first)}.{tail}"


def unet_to_original(state: dict, layers: int, blocks_with_attention: set[int]) -> dict:
    """Diffusers UNet keys -> 'model.diffusion_model.' keys (input/middle/output_blocks)."""
    out = {}
    for key, value in state.items():
        stem, _, param = key.rpartition(".")
        if stem in UNET_TOP_LEVEL:
            new = f"{UNET_TOP_LEVEL[stem]}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
            slot = 1 + block * (layers + 1) + index
            new = f"input_blocks.{slot}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{slot}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
            slot = block * (layers + 1) + index
            new = f"output_blocks.{slot}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{slot}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            block = int(m[1])
            position = 2 if block in blocks_with_attention else 1
            new = f"output_blocks.{block * (layers + 1) + layers}.{position}.conv.{m[2]}"
        else:
            raise KeyError(f"unmapped UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_original(state: dict, up_blocks: int) -> dict:
    """Diffusers AutoencoderKL keys -> 'first_stage_model.' keys (down/mid/up, 1x1 conv attention)."""
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{attention[m[2]]}.{m[3]}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", new):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(.*)", new):
            new = f"encoder.down.{m[1]}.block.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", new):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(.*)", new):
            new = f"decoder.up.{up_blocks - 1 - int(m[1])}.block.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", new):
            new = f"decoder.up.{up_blocks - 1 - int(m[1])}.upsample.{m[2]}"
        out["first_stage_model." + new] = value
    return out


def with_text_model_prefix(state: dict) -> dict:
    """Original checkpoints name CLIP weights 'text_model.*' (newer transformers drop that wrapper)."""
    return {key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}": value
            for key, value in state.items()}


def clip_to_original(state: dict) -> dict:
    """CLIP-L keeps the transformers names under 'conditioner.embedders.0.transformer.'."""
    return {f"conditioner.embedders.0.transformer.{key}": value for key, value in with_text_model_prefix(state).items()}


def open_clip_to_original(state: dict) -> dict:
    """The second encoder in OpenCLIP layout: fused q/k/v, resblocks, transposed projection."""
    state = with_text_model_prefix(state)
    prefix = "conditioner.embedders.1.model."
    out = {
        prefix + "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        prefix + "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        prefix + "ln_final.weight": state["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": state["text_model.final_layer_norm.bias"],
        prefix + "text_projection": state["text_projection.weight"].T,
    }
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for key, value in state.items():
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)\.(weight|bias)", key)
        if not m:
            continue
        block = f"{prefix}transformer.resblocks.{m[1]}."
        if m[2] in names:
            out[f"{block}{names[m[2]]}.{m[3]}"] = value
        elif m[2] == "self_attn.q_proj":
            stem = f"text_model.encoder.layers.{m[1]}.self_attn"
            fused = torch.cat([state[f"{stem}.{p}_proj.{m[3]}"] for p in "qkv"])
            out[f"{block}attn.in_proj_{m[3]}"] = fused
    return out


@pytest.fixture(scope="module")
def single_file(tiny_model, tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    folder = tiny_model("sdxl")
    pipeline = StableDiffusionXLPipeline.from_pretrained(folder)
    unet, vae = pipeline.unet, pipeline.vae
    with_attention = {i for i, name in enumerate(unet.config.up_block_types) if "CrossAttn" in name}
    state = unet_to_original(unet.state_dict(), unet.config.layers_per_block, with_attention)
    state.update(vae_to_original(vae.state_dict(), len(vae.config.up_block_types)))
    state.update(clip_to_original(pipeline.text_encoder.state_dict()))
    state.update(open_clip_to_original(pipeline.text_encoder_2.state_dict()))
    path = str(tmp_path_factory.mktemp("sf") / "tiny-sdxl.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return folder, path, pipeline


def test_single_file_loads_same_weights(single_file, monkeypatch):
    folder, path, reference = single_file
    monkeypatch.setitem(StableDiffusionXL.flavours, "base-1.0", folder)  # the architecture source
    family = StableDiffusionXL(Settings({"model_family": "sdxl", "pretrained_model_name_or_path": path,
                                         "vae_dtype": "fp32"}))
    components = family.load(torch.device("cpu"), torch.bfloat16)
    assert components.vae.dtype == torch.float32 and components.denoiser.dtype == torch.bfloat16
    pairs = [(components.denoiser, reference.unet), (components.vae, reference.vae),
             (components.text_encoders[0], reference.text_encoder),
             (components.text_encoders[1], reference.text_encoder_2)]
    for loaded, original in pairs:
        expected = original.state_dict()
        for key, value in loaded.state_dict().items():
            torch.testing.assert_close(value, expected[key].to(value.dtype), msg=key)
    assert components.noise_scheduler.config.prediction_type == "epsilon"
    assert type(components.extras["inference_scheduler"]).__name__ == "EulerDiscreteScheduler"
    latents = family.encode_images(torch.zeros(1, 3, 64, 64))
    assert latents.shape == (1, 4, 8, 8)


def test_missing_single_file_is_reported(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    family = StableDiffusionXL(Settings({"model_family": "sdxl", "pretrained_model_name_or_path": missing}))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        family.load(torch.device("cpu"), torch.float32)
