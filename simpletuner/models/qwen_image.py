"""Qwen-Image: a 20B MMDiT trained with flow matching on 16-channel latents of a Wan-style 3D causal VAE.

Prompts are encoded by Qwen2.5-VL through QwenImagePipeline.encode_prompt: the
caption is wrapped in the pipeline's chat template, the encoder's last hidden
states are taken for the real (unpadded) tokens, and the first
``prompt_template_encode_start_idx`` of them (the system prompt) are dropped.
What remains has one row per token of the caption, so prompts have different
lengths: a batch is padded to its longest prompt, and the attention mask that
marks the padding is cached with the embeddings and handed to the transformer.

The VAE works on videos, (B, C, frames, H, W); images are one frame. Latents
are cached as (B, 16, H/8, W/8), normalised by the VAE's per-channel
``latents_mean`` / ``latents_std`` the way QwenImagePipeline undoes it before
decoding. The transformer reads them packed into 2x2 patches, like Flux.
"""

from __future__ import annotations

from typing import Any

import torch

from simpletuner.config.settings import Settings
from simpletuner.data.types import TrainingBatch
from simpletuner.models.flux import pack_latents, unpack_latents
from simpletuner.models.pixart import TransformerFamilyLoading, alignment_problem, identity_digest
from simpletuner.models.registry import register
from simpletuner.models.sd import LazyClass, UNetLatentFamily
from simpletuner.models.sd3 import ATTENTION_LORA_TARGETS
from simpletuner.models.transformer_lora import save_transformer_lora

# QwenImagePipeline's __call__ reads 512 prompt tokens by default and refuses more than 1024.
DEFAULT_PROMPT_LENGTH = 512
PROMPT_LENGTH_LIMIT = 1024
PIXELS_PER_PATCH = 16  # 8x VAE, 2x2 patches


def text_attention_mask(text: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """The cached prompt mask as booleans, or None when every position is a real token.

    QwenImagePipeline drops an all-ones mask the same way, so training and
    inference take the same attention path.
    """
    mask = text.get("prompt_attention_mask")
    if mask is None:
        raise ValueError("the cached Qwen-Image text embeds have no prompt_attention_mask; delete the text embed "
                         "cache so it is rebuilt")
    mask = mask.to(device=device, dtype=torch.bool)
    return None if bool(mask.all()) else mask


@register
class QwenImage(TransformerFamilyLoading, UNetLatentFamily):
    """Qwen-Image (Alibaba Qwen): a 20B MMDiT on 16-channel latents of a Wan-style VAE, conditioned on
    Qwen2.5-VL (7B) and trained with flow matching. Each caption is wrapped in the chat template
    QwenImagePipeline uses and the system-prompt tokens are dropped from the encoder's output, so the
    text cache holds exactly what inference feeds the model. Prompts keep their own length (at most
    tokenizer_max_length, default 512, limit 1024); their attention mask is cached with them and padded
    batches mask the padding, so train_batch_size above 1 works here. The model is large: use
    gradient_checkpointing, mixed_precision bf16 and base_model_precision int8/int4/nf4 (int2-quanto for
    24 GB cards) with quantize_via=cpu. PEFT LoRA (rank 8 or less on 24 GB, learning rate around 1e-4,
    optimi-lion) loads with QwenImagePipeline.load_lora_weights. flow_schedule_shift 1.73 is a good start;
    flow_schedule_auto_shift suits mixed resolutions. validation_guidance is Qwen-Image's classifier-free
    guidance (the pipeline's true_cfg_scale, 3-4 works well); it applies when validation_negative_prompt
    is set, and validation_guidance_real replaces it when given. Image sides must be multiples of 16 px."""

    name = "qwen_image"
    flavours = {"v1.0": "Qwen/Qwen-Image"}
    default_flavour = "v1.0"
    default_prediction_type = "flow_matching"
    flow_matching = True
    valid_prediction_types = ("flow_matching",)
    denoiser_subfolder = "transformer"
    vae_class_name = "AutoencoderKLQwenImage"
    gguf_options = ("pretrained_transformer_model_name_or_path",)
    default_lora_targets = ATTENTION_LORA_TARGETS
    pipeline_class = LazyClass("diffusers", "QwenImagePipeline")
    img2img_pipeline_class = LazyClass("diffusers", "QwenImageImg2ImgPipeline")
    transformer_class = LazyClass("diffusers", "QwenImageTransformer2DModel")
    text_encoder_attributes = ("text_encoder",)
    supports_text_encoder_training = False

    # --- identity ---
    def prompt_length(self) -> int:
        """The most caption tokens kept after the system prompt: tokenizer_max_length, or 512."""
        return int(self.settings.tokenizer_max_length or DEFAULT_PROMPT_LENGTH)

    def fingerprint(self) -> str:
        s = self.settings
        return identity_digest(self.name, [self.name, self.model_path(s), s.revision, s.variant,
                                           s.pretrained_vae_model_name_or_path, self.prompt_length()])

    @classmethod
    def check_settings(cls, settings: Settings) -> list[str]:
        problems = super().check_settings(settings)
        if settings.train_text_encoder:
            problems.append("train_text_encoder is not supported for model_family=qwen_image (Qwen2.5-VL stays "
                            "frozen); set train_text_encoder to false")
        length = settings.tokenizer_max_length
        if length is not None and not 1 <= int(length) <= PROMPT_LENGTH_LIMIT:
            problems.append(f"tokenizer_max_length={length} is outside 1..{PROMPT_LENGTH_LIMIT} for "
                            f"model_family=qwen_image (QwenImagePipeline reads at most {PROMPT_LENGTH_LIMIT} "
                            f"prompt tokens); unset it for the default of {DEFAULT_PROMPT_LENGTH}")
        problems += alignment_problem(settings, cls.name, PIXELS_PER_PATCH, "8x VAE, 2x2 patches")
        return problems

    # --- loading ---
    def _load_text_encoders(self, path: str, weight_dtype: torch.dtype) -> tuple[list, list]:
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        tokenizer, encoder = self._load_encoder_pair(path, Qwen2Tokenizer, Qwen2_5_VLForConditionalGeneration,
                                                     weight_dtype)
        return [tokenizer], [encoder]

    def _training_scheduler(self, scheduler_config: dict):
        """Training only reads num_train_timesteps; sigmas come from the flow_* options."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        steps = int(scheduler_config.get("num_train_timesteps", 1000))
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=steps)

    def _inference_scheduler(self, scheduler_config: dict):
        """The scheduler the model ships, unchanged (its resolution-dependent shift included)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    # --- encoders ---
    def _text_pipeline(self):
        """A QwenImagePipeline holding only the tokenizer and text encoder, for its encode_prompt."""
        components = self._loaded()
        return self.pipeline_class(scheduler=None, vae=None, transformer=None,
                                   text_encoder=components.text_encoders[0], tokenizer=components.tokenizers[0])

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompt_embeds (B, L, D) and prompt_attention_mask (B, L), L = the longest prompt's token count.

        The mask is kept even when every position is real (the pipeline drops it then), so batches that
        mix cached prompts of different lengths can be padded and masked.
        """
        encoder = self._loaded().text_encoders[0]
        with torch.no_grad():
            embeds, mask = self._text_pipeline().encode_prompt(list(prompts), device=encoder.device,
                                                               max_sequence_length=self.prompt_length())
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel latent mean and std, shaped (1, C, 1, 1, 1) to broadcast over videos."""
        config = self._loaded().vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(device=like.device, dtype=like.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(device=like.device, dtype=like.dtype)
        return mean, std

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(posterior mean - latents_mean) / latents_std of single-frame videos, as (B, 16, H/8, W/8).

        The mean (not a sample) keeps cached latents reproducible.
        """
        vae = self._loaded().vae
        frames = pixels.to(device=vae.device, dtype=vae.dtype).unsqueeze(2)  # (B, 3, 1, H, W)
        with torch.no_grad():
            latents = vae.encode(frames).latent_dist.mean
        mean, std = self._latent_statistics(latents)
        return ((latents - mean) / std).squeeze(2)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents from ``encode_images`` back to pixels in [-1, 1] (B, 3, H, W)."""
        vae = self._loaded().vae
        frames = latents.to(device=vae.device, dtype=vae.dtype).unsqueeze(2)
        mean, std = self._latent_statistics(frames)
        with torch.no_grad():
            return vae.decode(frames * std + mean).sample[:, :, 0].clamp(-1, 1)

    # --- training ---
    def predict(self, batch: TrainingBatch, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The flow velocity (noise - latents) for ``noisy_latents`` (B, 16, H, W) at timesteps = sigma * 1000.

        The transformer is called as QwenImagePipeline's denoising step calls it: packed 2x2 patches, the
        timestep as sigma, one (frames, rows, columns) patch grid per sample.
        """
        components = self._loaded()
        device, dtype = noisy_latents.device, noisy_latents.dtype
        batch_size, _, height, width = noisy_latents.shape
        if height % 2 or width % 2:
            raise ValueError(f"Qwen-Image packs 2x2 latent patches, but a batch has a {height}x{width} latent grid; "
                             f"use bucket sizes that are multiples of {PIXELS_PER_PATCH} pixels")
        steps = components.noise_scheduler.config.num_train_timesteps
        tokens = components.denoiser(
            hidden_states=pack_latents(noisy_latents),
            timestep=timesteps.to(device=device, dtype=dtype).expand(batch_size) / steps,
            encoder_hidden_states=batch.text["prompt_embeds"].to(device=device, dtype=dtype),
            encoder_hidden_states_mask=text_attention_mask(batch.text, device),
            img_shapes=[[(1, height // 2, width // 2)]] * batch_size,
            return_dict=False,
        )[0]
        return unpack_latents(tokens, height, width)

    # --- inference and saving ---
    def pipeline_call_arguments(self) -> dict[str, Any]:
        """The prompt length training used, and validation_guidance as the pipeline's guidance.

        Qwen-Image has no distilled guidance input: its classifier-free guidance is the pipeline's
        true_cfg_scale (used when a negative prompt is given).
        """
        arguments: dict[str, Any] = {"max_sequence_length": self.prompt_length()}
        if self.settings.validation_guidance is not None:
            arguments["true_cfg_scale"] = float(self.settings.validation_guidance)
        return arguments

    def _pipeline_parts(self, denoiser: torch.nn.Module | None) -> dict[str, Any]:
        components = self._loaded()
        return {
            "vae": components.vae,
            "text_encoder": components.text_encoders[0],
            "tokenizer": components.tokenizers[0],
            "transformer": denoiser if denoiser is not None else components.denoiser,
        }

    def save_lora(self, output_dir: str, denoiser_lora_state: dict[str, torch.Tensor],
                  text_encoder_lora_states: dict[str, dict[str, torch.Tensor]] | None = None,
                  adapter_metadata: dict[str, dict] | None = None) -> None:
        """Write pytorch_lora_weights.safetensors with QwenImagePipeline.save_lora_weights, atomically."""
        save_transformer_lora(self, output_dir, denoiser_lora_state, text_encoder_lora_states, adapter_metadata)
