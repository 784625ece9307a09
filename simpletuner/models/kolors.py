"""Kwai Kolors: the SDXL UNet architecture conditioned on one ChatGLM3-6B text encoder.

Everything but the text encoder is SDXL's (sdxl.py): the VAE, epsilon
prediction, the pooled text embedding and the six size/crop numbers of
micro-conditioning. The text side follows KolorsPipeline.encode_prompt:
ChatGLM3 reads 256 tokens, padded on the left; ``prompt_embeds`` is its
penultimate hidden state and ``pooled_prompt_embeds`` the last token's state
after the final layer, before the closing norm. The UNet projects ChatGLM's
4096 wide states to its 2048 wide cross-attention itself (``encoder_hid_proj``).
"""

from __future__ import annotations

import torch

from simpletuner.config.settings import Settings
from simpletuner.models.base import Components
from simpletuner.models.registry import register
from simpletuner.models.sd import LazyClass, UNetLatentFamily
from simpletuner.models.sdxl import StableDiffusionXL, is_single_file

# KolorsPipeline tokenizes every prompt to exactly this many tokens (its encode_prompt ignores
# max_sequence_length), so training uses the same length for what it caches.
KOLORS_PROMPT_LENGTH = 256


@register
class Kolors(StableDiffusionXL):
    """Kwai Kolors: an SDXL-architecture UNet conditioned on the ChatGLM3-6B language model (a 6B-parameter
    bilingual text encoder, prompts of 256 tokens) with SDXL's VAE and size/crop micro-conditioning;
    epsilon prediction over 1100 training timesteps, trained around 1024px on multi-aspect buckets (use
    resolution 1024 with resolution_type pixel_area). LoRA on the UNet's attention projections at a learning
    rate near 1e-4 is the usual start (1e-5 if it burns); full fine-tunes want around 1e-6. ChatGLM stays
    frozen (train_text_encoder is not available) and is only needed while caching text embeds: quantise it
    with text_encoder_1_precision, or unload it after caching. Validation guidance between 4 and 6.5 suits
    it. Keep vae_dtype at fp32/bf16 as for SDXL. Single-file checkpoints are not supported (diffusers has
    no single-file loader for Kolors)."""

    name = "kolors"
    flavours = {"1.0": "Kwai-Kolors/Kolors-diffusers"}
    default_flavour = "1.0"
    default_prediction_type = "epsilon"
    pipeline_class = LazyClass("diffusers", "KolorsPipeline")
    img2img_pipeline_class = LazyClass("diffusers", "KolorsImg2ImgPipeline")
    text_encoder_attributes = ("text_encoder",)
    supports_text_encoder_training = False

    @classmethod
    def check_settings(cls, settings: Settings) -> list[str]:
        problems = super().check_settings(settings)
        path = settings.pretrained_model_name_or_path
        if path and is_single_file(path):
            problems.append(
                f"pretrained_model_name_or_path={path!r} is a single-file checkpoint, which model_family=kolors "
                "cannot load (diffusers has no single-file loader for KolorsPipeline); give a diffusers folder or "
                "hub id such as Kwai-Kolors/Kolors-diffusers"
            )
        if settings.train_text_encoder:
            problems.append(
                "train_text_encoder is not supported for model_family=kolors (ChatGLM3-6B stays frozen); "
                "set train_text_encoder=false"
            )
        length = settings.tokenizer_max_length
        if length and int(length) != KOLORS_PROMPT_LENGTH:
            problems.append(
                f"tokenizer_max_length={length} does not apply to model_family=kolors: KolorsPipeline always "
                f"encodes {KOLORS_PROMPT_LENGTH} ChatGLM tokens, so training must too; remove tokenizer_max_length"
            )
        return problems

    # --- loading ---
    def load(self, device: torch.device, weight_dtype: torch.dtype) -> Components:
        path = self.model_path(self.settings)
        if is_single_file(path):
            raise ValueError(f"pretrained_model_name_or_path={path!r}: model_family=kolors loads diffusers folders "
                             "or hub ids only, not single-file checkpoints")
        return UNetLatentFamily.load(self, device, weight_dtype)

    def _load_text_encoders(self, path: str, weight_dtype: torch.dtype) -> tuple[list, list]:
        from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer

        tokenizer, encoder = self._load_encoder_pair(path, ChatGLMTokenizer, ChatGLMModel, weight_dtype)
        return [tokenizer], [encoder]

    # --- encoders ---
    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """ChatGLM's penultimate hidden states and the pooled last token, as KolorsPipeline.encode_prompt."""
        components = self._loaded()
        tokenizer, encoder = components.tokenizers[0], components.text_encoders[0]
        tokens = tokenizer(list(prompts), padding="max_length", max_length=KOLORS_PROMPT_LENGTH, truncation=True,
                           return_tensors="pt").to(encoder.device)
        with torch.no_grad():
            output = encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                             position_ids=tokens["position_ids"], output_hidden_states=True)
        # ChatGLM's hidden states are (sequence, batch, width).
        prompt_embeds = output.hidden_states[-2].permute(1, 0, 2).contiguous()
        pooled = output.hidden_states[-1][-1].clone()
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    # --- inference ---
    def _pipeline_parts(self, denoiser: torch.nn.Module | None) -> dict:
        components = self._loaded()
        return {
            "vae": components.vae,
            "text_encoder": components.text_encoders[0],
            "tokenizer": components.tokenizers[0],
            "unet": denoiser if denoiser is not None else components.denoiser,
        }
