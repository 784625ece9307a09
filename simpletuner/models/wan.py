"""Wan 2.1 text-to-video, trained on still images as one-frame videos.

The datasets deliver images (dataset_type=video is not implemented yet), so
every image is a video of one frame: the 3D causal VAE encodes it to a single
latent frame, which the latent cache stores without its frame axis
(B, C, H/8, W/8) like any image family; ``predict`` adds the axis back for
the transformer and removes it from the output. Validation renders a
one-frame video with WanPipeline and keeps that frame as the image.

Latents are normalised per channel as WanPipeline undoes it before decoding:
(mean - latents_mean) / latents_std. Prompts are encoded by UMT5 through
WanPipeline.encode_prompt, which cleans the text, keeps the tokens up to the
prompt's end and pads the rest of the sequence with zeros (the transformer
takes no attention mask).
"""

from __future__ import annotations

from typing import Any

import torch

from simpletuner.data.types import TrainingBatch
from simpletuner.models.pixart import encode_with_pipeline
from simpletuner.models.registry import register
from simpletuner.models.sana import GemmaFlowFamily
from simpletuner.models.sd import LazyClass

WAN_PROMPT_LENGTH = 512  # UMT5 tokens, Wan 2.1's text length
FRAME_AXIS = 2  # video tensors are (B, C, F, H, W)


def latent_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latents_mean and latents_std, shaped to broadcast over (B, C, F, H, W)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
    return mean, std


@register
class Wan(GemmaFlowFamily):
    """Wan 2.1 text-to-video (Wan-AI): a flow-matching video DiT on a 3D causal VAE (8x spatial, 4x temporal),
    conditioned on UMT5-XXL. This build trains on still images only, each as a one-frame video
    (dataset_type=video is not implemented yet); validation renders one-frame videos and saves the frame.
    PEFT LoRA (rank 16-32, learning rate around 1e-4) loads with WanPipeline.load_lora_weights; full
    fine-tunes save a folder WanPipeline.from_pretrained reads. The 1.3B flavour trains at 832x480 in
    about 12 GB; the 14B one needs far more. Image sides must be multiples of 16 px."""

    name = "wan"
    flavours = {
        "t2v-480p-1.3b-2.1": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        "t2v-480p-14b-2.1": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    }
    default_flavour = "t2v-480p-1.3b-2.1"
    pipeline_class = LazyClass("diffusers", "WanPipeline")
    transformer_class = LazyClass("diffusers", "WanTransformer3DModel")
    vae_class_name = "AutoencoderKLWan"
    diffusers_loads_comfyui_lora = False
    default_prompt_length = WAN_PROMPT_LENGTH
    pipeline_call_extras = {"num_frames": 1}
    patch_pixels = 16
    patch_pixels_reason = "8x VAE, 2x2 patches"

    # --- identity ---
    def text_identity(self) -> list:
        return [self.prompt_length()]

    # --- loading ---
    def _load_text_encoders(self, path: str, weight_dtype: torch.dtype) -> tuple[list, list]:
        from transformers import AutoTokenizer, UMT5EncoderModel

        tokenizer, encoder = self._load_encoder_pair(path, AutoTokenizer, UMT5EncoderModel, weight_dtype)
        return [tokenizer], [encoder]

    # --- encoders ---
    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompt_embeds (B, L, D): UMT5's output up to each prompt's end, zeros after, L = the prompt length."""
        embeds, _ = encode_with_pipeline(self, prompts, max_sequence_length=self.prompt_length())
        return {"prompt_embeds": embeds}

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B,3,H,W) in [-1, 1] -> normalised one-frame latents without the frame axis (B,C,H/8,W/8)."""
        vae = self._loaded().vae
        video = pixels.to(device=vae.device, dtype=vae.dtype).unsqueeze(FRAME_AXIS)
        with torch.no_grad():
            latents = vae.encode(video).latent_dist.mean
        mean, std = latent_statistics(vae, latents)
        return ((latents - mean) / std).squeeze(FRAME_AXIS)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents from ``encode_images`` back to pixels in [-1, 1] (B,3,H,W)."""
        vae = self._loaded().vae
        video = latents.to(device=vae.device, dtype=vae.dtype).unsqueeze(FRAME_AXIS)
        mean, std = latent_statistics(vae, video)
        with torch.no_grad():
            return vae.decode(video * std + mean).sample.squeeze(FRAME_AXIS).clamp(-1, 1)

    # --- training ---
    def predict(self, batch: TrainingBatch, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The flow velocity (noise - latents) for one-frame latents; timesteps are sigma * num_train_timesteps,
        which WanPipeline passes to the transformer unchanged."""
        components = self._loaded()
        device, dtype = noisy_latents.device, noisy_latents.dtype
        output = components.denoiser(
            hidden_states=noisy_latents.unsqueeze(FRAME_AXIS),
            timestep=timesteps.to(device=device, dtype=torch.float32).expand(noisy_latents.shape[0]),
            encoder_hidden_states=batch.text["prompt_embeds"].to(device=device, dtype=dtype),
            return_dict=False,
        )[0]
        return output.squeeze(FRAME_AXIS)

    # --- inference ---
    def rendered_image(self, result: Any) -> Any:
        """The first frame of the first video WanPipeline rendered (output_type="pil")."""
        return result.frames[0][0]
