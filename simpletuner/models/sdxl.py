"""Stable Diffusion XL: two CLIP text encoders, pooled text embeds and size micro-conditioning.

The UNet is conditioned on the concatenated penultimate hidden states of
CLIP-L and OpenCLIP-G, plus ``text_embeds`` (OpenCLIP-G's projected pooled
output) and ``time_ids``: original size, crop top-left and target size, six
numbers per sample, (height, width) order.

The base model may also be a single ``.safetensors`` / ``.ckpt`` file
(pretrained_model_name_or_path). Its architecture comes from the diffusers
folder of the chosen flavour (model_flavour or the default), which may be a
hub id (read from the hub cache or downloaded) or a local folder.
"""

from __future__ import annotations

import os

import torch

from simpletuner.config.settings import Settings
from simpletuner.data.types import TrainingBatch
from simpletuner.models.base import Components
from simpletuner.models.registry import register
from simpletuner.models.sd import LazyClass, UNetLatentFamily

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def is_single_file(path: str) -> bool:
    return path.lower().endswith(SINGLE_FILE_SUFFIXES)


@register
class StableDiffusionXL(UNetLatentFamily):
    """SDXL: two CLIP text encoders (ViT-L and OpenCLIP ViT-bigG, with its pooled output) and size/crop
    micro-conditioning, epsilon prediction, trained around 1024px (use resolution 1024 with
    resolution_type pixel_area). LoRA on the attention projections with rank 16-64 and a learning rate near
    1e-4 is a good start; full fine-tunes want 1e-6 to 1e-5. Keep vae_dtype at fp32/bf16: the stock VAE
    overflows in fp16 unless pretrained_vae_model_name_or_path names an fp16-fixed VAE. A single-file
    .safetensors checkpoint can be given as pretrained_model_name_or_path; its architecture comes from the
    flavour's folder."""

    name = "sdxl"
    flavours = {
        "base-1.0": "stabilityai/stable-diffusion-xl-base-1.0",
        "base-0.9": "stabilityai/stable-diffusion-xl-base-0.9",
    }
    default_flavour = "base-1.0"
    default_prediction_type = "epsilon"
    pipeline_class = LazyClass("diffusers", "StableDiffusionXLPipeline")
    img2img_pipeline_class = LazyClass("diffusers", "StableDiffusionXLImg2ImgPipeline")
    text_encoder_attributes = ("text_encoder", "text_encoder_2")

    @classmethod
    def check_settings(cls, settings: Settings) -> list[str]:
        problems = super().check_settings(settings)
        if settings.vae_dtype == "fp16" and not settings.pretrained_vae_model_name_or_path:
            problems.append(
                "vae_dtype='fp16' overflows SDXL's VAE (black or NaN images); set vae_dtype to bf16 or fp32, "
                "or use an fp16-safe VAE via pretrained_vae_model_name_or_path (e.g. madebyollin/sdxl-vae-fp16-fix)"
            )
        return problems

    # --- loading ---
    def load(self, device: torch.device, weight_dtype: torch.dtype) -> Components:
        path = self.model_path(self.settings)
        if not is_single_file(path):
            return super().load(device, weight_dtype)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"pretrained_model_name_or_path={path!r} looks like a single-file checkpoint but does not exist"
            )
        return self._load_single_file(path, device, weight_dtype)

    def _load_single_file(self, path: str, device: torch.device, weight_dtype: torch.dtype) -> Components:
        config, preloaded = self._single_file_parts(path, weight_dtype, self._load_unet)
        pipeline = self.pipeline_class.from_single_file(path, config=config, torch_dtype=weight_dtype, **preloaded)
        components = Components(
            denoiser=pipeline.unet,
            vae=pipeline.vae,
            text_encoders=[pipeline.text_encoder, pipeline.text_encoder_2],
            tokenizers=[pipeline.tokenizer, pipeline.tokenizer_2],
        )
        self._finish_load(components, config, device, scheduler_config=dict(pipeline.scheduler.config))
        return components

    def _load_text_encoders(self, path: str, weight_dtype: torch.dtype) -> tuple[list, list]:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        revision = {"revision": self.settings.revision} if self.settings.revision else {}
        tokenizers = [
            CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **revision),
            CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **revision),
        ]
        encoders = [
            CLIPTextModel.from_pretrained(
                path, subfolder="text_encoder", dtype=weight_dtype, **self._pretrained_kwargs(),
                **self.quantization_load_kwargs("text_encoder", weight_dtype),
            ),
            CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", dtype=weight_dtype, **self._pretrained_kwargs(),
                **self.quantization_load_kwargs("text_encoder_2", weight_dtype),
            ),
        ]
        return tokenizers, encoders

    # --- encoders ---
    def encode_text_for_training(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Both encoders' penultimate hidden states, concatenated; pooled output from the second.

        ``encode_text`` (inherited) runs this without gradients.
        """
        components = self._loaded()
        hidden_states = []
        pooled = None
        for tokenizer, encoder in zip(components.tokenizers, components.text_encoders):
            ids = self._tokenize(tokenizer, list(prompts), encoder.device)
            output = encoder(ids, output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
            pooled = output[0]  # CLIPTextModelWithProjection: the projected pooled embedding
        return {"prompt_embeds": torch.cat(hidden_states, dim=-1), "pooled_prompt_embeds": pooled}

    # --- training ---
    @staticmethod
    def time_ids(batch: TrainingBatch) -> torch.Tensor:
        """(B, 6): original (h, w), crop (top, left), target (h, w) for each sample."""
        rows = [
            [*original, *crop, *target]
            for original, crop, target in zip(batch.original_sizes, batch.crop_coords, batch.target_sizes)
        ]
        if len(rows) != batch.size:
            raise ValueError(
                f"batch has {batch.size} latents but {len(rows)} complete size records "
                "(original_sizes, crop_coords and target_sizes must each have one entry per sample)"
            )
        return torch.tensor(rows, dtype=torch.float32)

    def _added_conditions(self, batch: TrainingBatch, dtype: torch.dtype, device: torch.device) -> dict:
        return {
            "text_embeds": batch.text["pooled_prompt_embeds"].to(device=device, dtype=dtype),
            "time_ids": self.time_ids(batch).to(device=device, dtype=dtype),
        }

    # --- inference ---
    def _pipeline_parts(self, denoiser: torch.nn.Module | None) -> dict:
        components = self._loaded()
        return {
            "vae": components.vae,
            "text_encoder": components.text_encoders[0],
            "text_encoder_2": components.text_encoders[1],
            "tokenizer": components.tokenizers[0],
            "tokenizer_2": components.tokenizers[1],
            "unet": denoiser if denoiser is not None else components.denoiser,
        }
