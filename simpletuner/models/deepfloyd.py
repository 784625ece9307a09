"""DeepFloyd IF: pixel-space UNets (no VAE) conditioned on T5-XXL; stage I (64px) and stage II (64 -> 256px).

There is no autoencoder: the "latents" the caches store and the trainer
noises are the training images themselves, RGB in [-1, 1] at the training
resolution (``encode_images`` and ``decode_latents`` are the identity), and
validation pipelines render pixels directly. ``vae_class_name`` is None, which
shared code reads as "this family has no VAE".

The UNet predicts noise and a learned variance (6 output channels for 3 input
ones); training scores the noise half only, as diffusers' IF pipelines split
the output. Prompts are encoded through IFPipeline's own ``encode_prompt``
(77 T5 tokens, lower-cased and stripped), so the text cache is exactly what
inference computes. Safety checker, feature extractor and watermarker are
never loaded: pipelines are built without them (``requires_safety_checker=False``).

The model_flavour picks the stage (``ii-*``: stage II super-resolution, whose
conditioning lives in deepfloyd_stage2.py); loading checks that the UNet's
input width matches it.
"""

from __future__ import annotations

from typing import Any

import torch

from simpletuner.config.settings import Settings
from simpletuner.data.types import TrainingBatch
from simpletuner.models import deepfloyd_stage2 as stage2
from simpletuner.models.base import Components
from simpletuner.models.pixart import alignment_problem, encode_with_pipeline, identity_digest
from simpletuner.models.registry import register
from simpletuner.models.sd import LazyClass, UNetLatentFamily

# LoRA targets: the attention projections, including the extra key/value projections of the text
# tokens in IF's simple cross-attention blocks.
IF_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
IF_PROMPT_LENGTH = 77  # IFPipeline.encode_prompt always tokenizes to 77 T5 positions
IMAGE_CHANNELS = 3
STAGE_II_PREFIX = "ii-"
UNET_ALIGNMENT = 8  # the IF UNets halve the image three times
VAE_OPTIONS = ("pretrained_vae_model_name_or_path", "vae_enable_slicing", "vae_enable_tiling")
# The validation/inference scheduler's variance: training fits only the noise half of the output,
# so renders use the fixed variance rather than the (untrained) learned one, as the reference's
# inference example does after loading trained weights.
RENDER_VARIANCE_TYPE = "fixed_small"


def noise_half(output: torch.Tensor, channels: int) -> torch.Tensor:
    """The noise prediction of a learned-variance output (2 x ``channels``); other outputs unchanged."""
    if output.shape[1] == 2 * channels:
        return output[:, :channels]
    return output


@register
class DeepFloydIF(UNetLatentFamily):
    """DeepFloyd IF: pixel-space UNets with no VAE, conditioned on T5-XXL (77 tokens), epsilon prediction on IF's
    cosine DDPM schedule. Stage I (400M / 900M / 4.3B) trains on the images themselves at 64px: set resolution 64
    with resolution_type pixel (multi-aspect buckets such as 96x64 need aspect_bucket_alignment 32), and the
    latent cache holds pixels. The UNet also predicts a variance; training fits the noise half, so validation
    renders with the fixed_small variance, and saved full pipelines carry that scheduler setting (set it
    yourself when rendering a LoRA with diffusers). Pixel-space training degrades without loss weighting:
    use_soft_min_snr (with snr_gamma, e.g. 5) is close to required. LoRA (rank 16-32, learning rate near 4e-5
    falling to 4e-6) covers the attention and its added text key/value projections; a full fine-tune of even
    the 400M model needs well over 48 GB. Keep validation_resolution small (64 or 96x64). The stage II flavours
    (ii-*) train the 64 -> 256px super-resolution UNet, loaded with IFSuperResolutionPipeline: set resolution
    256; each training image, shrunk 4x, upscaled and noised to a random noise level, is its conditioning, and
    validation upscales dataset images (validation_using_datasets=true, num_eval_images per dataset) instead
    of rendering prompts. pretrained_t5_model_name_or_path shares one T5 copy between the stages."""

    name = "deepfloyd"
    flavours = {
        "i-medium-400m": "DeepFloyd/IF-I-M-v1.0",
        "i-large-900m": "DeepFloyd/IF-I-L-v1.0",
        "i-xlarge-4.3b": "DeepFloyd/IF-I-XL-v1.0",
        "ii-medium-450m": "DeepFloyd/IF-II-M-v1.0",
        "ii-large-1.2b": "DeepFloyd/IF-II-L-v1.0",
    }
    default_flavour = "i-medium-400m"
    default_prediction_type = "epsilon"
    valid_prediction_types = ("epsilon",)
    vae_class_name = None  # pixel space
    default_lora_targets = IF_LORA_TARGETS
    pipeline_class = LazyClass("diffusers", "IFPipeline")
    img2img_pipeline_class = LazyClass("diffusers", "IFImg2ImgPipeline")
    super_resolution_pipeline_class = LazyClass("diffusers", "IFSuperResolutionPipeline")
    text_encoder_attributes = ("text_encoder",)
    supports_text_encoder_training = False

    # --- identity ---
    @classmethod
    def is_stage_ii(cls, settings: Settings) -> bool:
        """Whether model_flavour names a stage II (super-resolution) model."""
        return (settings.model_flavour or "").startswith(STAGE_II_PREFIX)

    def fingerprint(self) -> str:
        s = self.settings
        return identity_digest(self.name, [self.name, self.model_path(s), s.revision, s.variant,
                                           s.pretrained_t5_model_name_or_path, IF_PROMPT_LENGTH])

    @classmethod
    def check_settings(cls, settings: Settings) -> list[str]:
        problems = super().check_settings(settings)
        if cls.is_stage_ii(settings):
            problems += stage2.stage_ii_problems(settings)
        problems += alignment_problem(settings, cls.name, UNET_ALIGNMENT, "the UNet halves the image three times")
        for option in VAE_OPTIONS:
            if getattr(settings, option):
                problems.append(f"{option} does not apply to model_family=deepfloyd, which trains on pixels and has "
                                f"no VAE; remove {option}")
        if settings.train_text_encoder:
            problems.append("train_text_encoder is not supported for model_family=deepfloyd (T5 stays frozen); "
                            "set train_text_encoder to false")
        length = settings.tokenizer_max_length
        if length is not None and int(length) != IF_PROMPT_LENGTH:
            problems.append(f"tokenizer_max_length={length} does not apply to model_family=deepfloyd: IFPipeline "
                            f"always encodes {IF_PROMPT_LENGTH} T5 tokens, so training on another length would not "
                            "match inference; unset tokenizer_max_length")
        return problems

    # --- loading ---
    def load(self, device: torch.device, weight_dtype: torch.dtype) -> Components:
        path = self.model_path(self.settings)
        tokenizers, text_encoders = self._load_text_encoders(path, weight_dtype)
        unet = self._load_unet(path, weight_dtype)
        self._check_stage(unet, path)
        components = Components(denoiser=unet, vae=None, text_encoders=text_encoders, tokenizers=tokenizers)
        self._finish_load(components, path, device)
        return components

    def _check_stage(self, unet, path: str) -> None:
        """Stage I UNets read the 3 image channels; stage II ones also the 3 of the upscaled low-resolution image."""
        stage_ii = self.is_stage_ii(self.settings)
        expected = 2 * IMAGE_CHANNELS if stage_ii else IMAGE_CHANNELS
        found = int(unet.config.in_channels)
        if found == expected:
            return
        flavour = self.settings.model_flavour or self.default_flavour
        stage, other = ("II", "I") if stage_ii else ("I", "II")
        others = [name for name in self.flavours if name.startswith(STAGE_II_PREFIX) != stage_ii]
        raise ValueError(
            f"model_flavour={flavour} is a DeepFloyd IF stage {stage} flavour, but the UNet of {path} reads {found} "
            f"channels where stage {stage} models read {expected}. Set model_flavour to a stage {other} flavour "
            f"({', '.join(others)}) or point pretrained_model_name_or_path / pretrained_unet_model_name_or_path at a "
            f"stage {stage} model")

    def _load_text_encoders(self, path: str, weight_dtype: torch.dtype) -> tuple[list, list]:
        """T5 from the base model, or from pretrained_t5_model_name_or_path (IF-style or plain T5 folder)."""
        tokenizer, encoder = self._load_replaceable_t5(path, weight_dtype)
        return [tokenizer], [encoder]

    def _finish_load(self, components: Components, path: str, device: torch.device,
                     scheduler_config: dict | None = None) -> None:
        """The shared schedulers, freezing and placement (there is no VAE); stage II also gets the scheduler
        that noises its upscaled input."""
        from diffusers import DDPMScheduler

        super()._finish_load(components, path, device, scheduler_config)
        if self.is_stage_ii(self.settings):
            revision = {"revision": self.settings.revision} if self.settings.revision else {}
            components.extras["image_noising_scheduler"] = DDPMScheduler.from_pretrained(
                path, subfolder="image_noising_scheduler", **revision)

    def _inference_scheduler(self, scheduler_config: dict):
        """The model's own scheduler (DDPM), with the fixed variance: see RENDER_VARIANCE_TYPE."""
        scheduler = super()._inference_scheduler(scheduler_config)
        if "variance_type" not in scheduler.config:
            return scheduler
        return type(scheduler).from_config(scheduler.config, variance_type=RENDER_VARIANCE_TYPE)

    # --- encoders ---
    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompt_embeds (B, 77, D): T5's last hidden states, as IFPipeline.encode_prompt computes them."""
        embeds, _ = encode_with_pipeline(self, prompts, clean_caption=False)
        return {"prompt_embeds": embeds}

    def encode_text_for_training(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError("model_family=deepfloyd cannot train its T5 text encoder")

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel space: the cached "latents" are the images themselves, (B,3,H,W) in [-1, 1], float32."""
        return pixels.detach().to(dtype=torch.float32).clone()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The identity (pixel space), clamped to [-1, 1] as every family's decode is."""
        return latents.detach().to(dtype=torch.float32).clamp(-1, 1)

    # --- training ---
    def predict(self, batch: TrainingBatch, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction; the learned-variance half of its output is dropped.

        Stage II also reads the upscaled, noised low-resolution version of the clean image
        (``batch.latents``) beside the noisy one, and that noise level as ``class_labels``.
        """
        components = self._loaded()
        device, dtype = noisy_latents.device, noisy_latents.dtype
        sample, extra = noisy_latents, {}
        if self.is_stage_ii(self.settings):
            clean = batch.latents.to(device=device, dtype=torch.float32)
            condition, levels = stage2.training_condition(clean, components.extras["image_noising_scheduler"])
            sample = torch.cat([noisy_latents, condition.to(dtype)], dim=1)
            extra["class_labels"] = levels
        output = components.denoiser(
            sample,
            timesteps.to(device),
            encoder_hidden_states=batch.text["prompt_embeds"].to(device=device, dtype=dtype),
            return_dict=False,
            **extra,
            **self.control_kwargs(batch),
        )[0]
        return noise_half(output, noisy_latents.shape[1])

    # --- inference and saving ---
    def pipeline_call_arguments(self) -> dict:
        # Training captions are only lower-cased and stripped; the pipeline's default "cleaning" needs bs4 and
        # ftfy and would change prompts the text cache did not see.
        return {"clean_caption": False}

    def _pipeline_parts(self, denoiser: torch.nn.Module | None, text_only: bool = False) -> dict[str, Any]:
        components = self._loaded()
        return {
            "tokenizer": components.tokenizers[0],
            "text_encoder": components.text_encoders[0],
            "unet": None if text_only else (denoiser if denoiser is not None else components.denoiser),
            "scheduler": None,  # build_pipeline sets the inference scheduler
            "safety_checker": None,
            "feature_extractor": None,
            "watermarker": None,
            "requires_safety_checker": False,
        }

    def build_pipeline(self, denoiser: torch.nn.Module | None = None, *, img2img: bool = False, **overrides):
        """IFPipeline (img2img: IFImg2ImgPipeline); stage II: IFSuperResolutionPipeline.

        A stage II img2img pipeline (validation on dataset images) shrinks its input 4x before upscaling.
        """
        if not self.is_stage_ii(self.settings):
            return super().build_pipeline(denoiser, img2img=img2img, **overrides)
        extras = self._loaded().extras
        parts = self._pipeline_parts(denoiser)
        for name, scheduler in (("scheduler", extras["inference_scheduler"]),
                                ("image_noising_scheduler", extras["image_noising_scheduler"])):
            parts[name] = type(scheduler).from_config(scheduler.config)  # copies: pipelines mutate them
        parts.update(overrides)
        pipeline_class = (stage2.upscale_validation_pipeline_class() if img2img
                          else self.super_resolution_pipeline_class)
        return pipeline_class(**parts)
