"""AuraFlow: an MMDiT + single-stream DiT trained with flow matching on 4-channel (SDXL) VAE latents.

Text comes from one UMT5 encoder (Pile-T5). As in diffusers' AuraFlowPipeline,
the encoder sees the attention mask and the padded positions of its output
are zeroed; ``encode_text`` also returns the mask. The transformer takes the
flow timestep as a fraction in [0, 1], so ``predict`` divides the trainer's
0..num_train_timesteps value by num_train_timesteps.

T5 reads 128 tokens (768 for the pony flavour) unless tokenizer_max_length
says otherwise; longer inputs than the flavour was trained with need
i_know_what_i_am_doing.
"""

from __future__ import annotations

from typing import Any

import torch

from simpletuner.config.settings import Settings
from simpletuner.data.types import TrainingBatch
from simpletuner.models.registry import register
from simpletuner.models.sd import LazyClass
from simpletuner.models.sd3 import ATTENTION_LORA_TARGETS, FlowTransformerFamily

JOINT_ATTENTION_LORA_TARGETS = ATTENTION_LORA_TARGETS + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@register
class AuraFlow(FlowTransformerFamily):
    name = "auraflow"
    flavours = {
        "v0.3": "terminusresearch/auraflow-v0.3",
        "v0.2": "fal/AuraFlow-v0.2",
        "v0.1": "fal/AuraFlow",
        "pony": "purplesmartai/pony-v7-base",
    }
    default_flavour = "v0.3"
    default_t5_length = 128
    # T5 lengths each flavour was trained with; others use default_t5_length.
    flavour_t5_lengths = {"pony": 768}
    default_lora_targets = JOINT_ATTENTION_LORA_TARGETS
    transformer_class = LazyClass("diffusers", "AuraFlowTransformer2DModel")
    pipeline_class = LazyClass("diffusers", "AuraFlowPipeline")
    img2img_pipeline_class = None  # diffusers has no AuraFlow img2img pipeline
    text_encoder_attributes = ("text_encoder",)

    @classmethod
    def flavour_t5_length(cls, settings: Settings) -> int:
        return cls.flavour_t5_lengths.get(settings.model_flavour or cls.default_flavour, cls.default_t5_length)

    @classmethod
    def t5_length_limit(cls, settings: Settings) -> int:
        """Longer T5 inputs than the flavour was trained with degrade the model."""
        return cls.flavour_t5_length(settings)

    def t5_length(self) -> int:
        return int(self.settings.tokenizer_max_length or self.flavour_t5_length(self.settings))

    @classmethod
    def check_settings(cls, settings: Settings) -> list[str]:
        problems = super().check_settings(settings)
        if settings.is_set("t5_padding") and settings.t5_padding != "zero":
            problems.append(f"t5_padding={settings.t5_padding!r} does not apply to model_family=auraflow: its "
                            "pipeline always zeroes padded T5 positions, and training matches it; remove t5_padding")
        return problems

    # --- loading ---
    def _load_text_encoders(self, path: str, weight_dtype: torch.dtype) -> tuple[list, list]:
        from transformers import AutoTokenizer, UMT5EncoderModel

        tokenizer, encoder = self._load_t5(path, UMT5EncoderModel, AutoTokenizer, "text_encoder", "tokenizer",
                                           weight_dtype)
        return [tokenizer], [encoder]

    # --- encoders ---
    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``prompt_embeds`` (B, T5 length, width), zero where padded, and ``prompt_attention_mask`` (B, T5 length)."""
        components = self._loaded()
        hidden, mask = self._encode_t5(components.tokenizers[0], components.text_encoders[0], list(prompts))
        embeds = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    # --- training ---
    def predict(self, batch: TrainingBatch, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        components = self._loaded()
        scale = float(components.noise_scheduler.config.num_train_timesteps)
        device, dtype = noisy_latents.device, noisy_latents.dtype
        return components.denoiser(
            noisy_latents,
            encoder_hidden_states=batch.text["prompt_embeds"].to(device=device, dtype=dtype),
            timestep=self._flow_timesteps(timesteps, noisy_latents) / scale,
            return_dict=False,
        )[0]

    # --- inference ---
    def _pipeline_parts(self, denoiser: torch.nn.Module | None) -> dict[str, Any]:
        components = self._loaded()
        return {
            "tokenizer": components.tokenizers[0],
            "text_encoder": components.text_encoders[0],
            "vae": components.vae,
            "transformer": denoiser if denoiser is not None else components.denoiser,
        }

    def build_pipeline(self, denoiser: torch.nn.Module | None = None, *, img2img: bool = False, **overrides):
        if img2img:
            raise ValueError("model_family=auraflow has no img2img pipeline in diffusers; build the text-to-image one")
        return super().build_pipeline(denoiser, **overrides)
