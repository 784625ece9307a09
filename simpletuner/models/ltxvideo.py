"""LTX-Video (Lightricks): a flow-matching video DiT on the 128-channel latents of a 3D causal VAE
(32x spatial, 8x temporal compression), conditioned on T5-XXL with its attention mask.

Scope: this project's datasets deliver still images, so every sample is trained as a one-frame video.
The VAE is causal in time, so a single image is encoded exactly as the first frame of a clip is. The
latent cache keeps (B, 128, H/32, W/32) tensors normalised with the VAE's latents_mean/latents_std and
scaling_factor, as LTXPipeline does; ``predict`` adds the frame axis back and packs the grid into tokens
with the pipeline's own _pack_latents. Video datasets (dataset_type=video) stay refused by the loader.
"""

from __future__ import annotations

import torch

from simpletuner.config.settings import Settings
from simpletuner.data.types import TrainingBatch
from simpletuner.models.pixart import alignment_problem, prompt_length_problem
from simpletuner.models.registry import register
from simpletuner.models.sana import GemmaFlowFamily
from simpletuner.models.sd import LazyClass, UNetLatentFamily

LTX_PROMPT_LENGTH = 128  # T5 tokens, LTXPipeline's default max_sequence_length
LTX_FRAME_RATE = 25  # LTXPipeline's default frame_rate; it scales the temporal RoPE coordinates
SINGLE_FRAME = 1


def validation_size_problem(settings: Settings, pixels: int) -> list[str]:
    """A message when a validation_resolution size is not a multiple of ``pixels`` (LTXPipeline refuses it)."""
    from simpletuner.config.errors import ConfigError
    from simpletuner.validation.resolutions import parse_resolutions

    if not settings.validation_resolution:
        return []
    try:
        sizes = parse_resolutions(settings.validation_resolution)
    except ConfigError:
        return []  # reported by the validation_resolution check itself
    odd = [f"{width}x{height}" for width, height in sizes if width % pixels or height % pixels]
    if not odd:
        return []
    return [f"validation_resolution={settings.validation_resolution!r} has sizes LTXPipeline cannot render "
            f"({', '.join(odd)}): width and height must be multiples of {pixels} px, e.g. 768x512"]


# GemmaFlowFamily supplies the flow-matching schedulers, transformer loading, prompt encoding through the
# pipeline and LoRA saving; its Gemma loader and checks are replaced below by T5 and LTX's own.
@register
class LTXVideo(GemmaFlowFamily):
    """LTX-Video (Lightricks): a 2B flow-matching video transformer on a 3D causal VAE (32x spatial, 8x
    temporal), conditioned on T5-XXL (128 tokens, with its attention mask). Datasets here are still images,
    so each one trains as a single-frame video (the VAE's causal first frame) and validation renders a
    one-frame video with LTXPipeline, saving that frame as the image; video datasets are not supported yet.
    PEFT LoRA (rank 16-64, learning rate around 1e-4) loads with LTXPipeline.load_lora_weights; full
    fine-tunes save a folder LTXPipeline.from_pretrained reads. Image sides must be multiples of 32 px.
    Use flow_schedule_shift (e.g. 1-3) for the training shift; flow_schedule_auto_shift is refused. Training
    is text-to-video only: the image-to-video options (ltx_train_mode=i2v, ltx_i2v_prob, ...) are not
    implemented yet."""

    name = "ltxvideo"
    vae_class_name = "AutoencoderKLLTXVideo"
    latent_patch_size = 1  # one token per latent pixel of the (single) frame
    diffusers_loads_comfyui_lora = False  # LTXPipeline's loader rejects the ".alpha" keys; ComfyUI reads them
    flavours = {
        "0.9.5": "Lightricks/LTX-Video-0.9.5",
        "0.9.0": "Lightricks/LTX-Video",
    }
    default_flavour = "0.9.5"
    pipeline_class = LazyClass("diffusers", "LTXPipeline")
    transformer_class = LazyClass("diffusers", "LTXVideoTransformer3DModel")
    default_prompt_length = LTX_PROMPT_LENGTH
    patch_pixels = 32
    patch_pixels_reason = "32x causal video VAE, 1x1 patches"
    # Validation and inference render one frame: the images the model was trained on.
    pipeline_call_extras = {"num_frames": SINGLE_FRAME, "frame_rate": LTX_FRAME_RATE}

    # --- identity ---
    def text_identity(self) -> list:
        return [self.settings.pretrained_t5_model_name_or_path, self.prompt_length()]

    @classmethod
    def check_settings(cls, settings: Settings) -> list[str]:
        problems = UNetLatentFamily.check_settings.__func__(cls, settings)
        if settings.train_text_encoder:
            problems.append("train_text_encoder is not supported for model_family=ltxvideo (T5 stays frozen); "
                            "set train_text_encoder to false")
        if settings.flow_schedule_auto_shift:
            problems.append("flow_schedule_auto_shift is not supported for model_family=ltxvideo: the trainer's "
                            "resolution shift uses Flux's constants (256..4096 tokens, shift exp(0.5)..exp(1.15)), "
                            "not LTX-Video's (1024..4096, 0.95..2.05); set flow_schedule_auto_shift to false and "
                            "choose flow_schedule_shift instead")
        problems += prompt_length_problem(settings, cls.name)
        problems += alignment_problem(settings, cls.name, cls.patch_pixels, cls.patch_pixels_reason)
        problems += validation_size_problem(settings, cls.patch_pixels)
        return problems

    # --- loading ---
    def _load_text_encoders(self, path: str, weight_dtype: torch.dtype) -> tuple[list, list]:
        """T5 from the base model, or from pretrained_t5_model_name_or_path (as PixArt Sigma reads it)."""
        tokenizer, encoder = self._load_replaceable_t5(path, weight_dtype)
        return [tokenizer], [encoder]

    # --- encoders ---
    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        vae = self._loaded().vae
        shape = (1, -1, 1, 1, 1)
        mean = vae.latents_mean.view(shape).to(device=like.device, dtype=like.dtype)
        std = vae.latents_std.view(shape).to(device=like.device, dtype=like.dtype)
        return mean, std, float(vae.config.scaling_factor)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> normalised first-frame latents (B, C, H/32, W/32), posterior mean."""
        vae = self._loaded().vae
        video = pixels.to(device=vae.device, dtype=vae.dtype).unsqueeze(2)  # one frame
        with torch.no_grad():
            latents = vae.encode(video).latent_dist.mean
        mean, std, scale = self._latent_statistics(latents)
        return ((latents - mean) * scale / std).squeeze(2)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1] (decode_timestep 0, as the pipeline)."""
        vae = self._loaded().vae
        video = latents.to(device=vae.device, dtype=vae.dtype).unsqueeze(2)
        mean, std, scale = self._latent_statistics(video)
        video = video * std / scale + mean
        timestep = None
        if vae.config.timestep_conditioning:
            timestep = torch.zeros(video.shape[0], device=video.device, dtype=video.dtype)
        with torch.no_grad():
            frames = vae.decode(video, timestep, return_dict=False)[0]
        return frames[:, :, 0]

    # --- training ---
    def predict(self, batch: TrainingBatch, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The flow velocity (noise - latents) for one-frame latents, called as LTXPipeline's denoising step."""
        components = self._loaded()
        transformer, pipeline = components.denoiser, self.pipeline_class
        config = components.extras["transformer_config"]
        patch, patch_t = int(config.patch_size), int(config.patch_size_t)
        device, dtype = noisy_latents.device, noisy_latents.dtype
        height, width = noisy_latents.shape[-2] // patch, noisy_latents.shape[-1] // patch
        tokens = pipeline._pack_latents(noisy_latents.unsqueeze(2), patch, patch_t)
        output = transformer(
            hidden_states=tokens,
            encoder_hidden_states=batch.text["prompt_embeds"].to(device=device, dtype=dtype),
            timestep=timesteps.to(device=device, dtype=torch.float32).expand(noisy_latents.shape[0]),
            encoder_attention_mask=batch.text["prompt_attention_mask"].to(device),
            num_frames=SINGLE_FRAME, height=height, width=width,
            rope_interpolation_scale=self._rope_interpolation_scale(),
            return_dict=False,
        )[0]
        return pipeline._unpack_latents(output, SINGLE_FRAME, height, width, patch, patch_t).squeeze(2)

    def _rope_interpolation_scale(self) -> tuple[float, int, int]:
        """(temporal compression / frame rate, spatial compression, spatial compression), as LTXPipeline uses."""
        vae = self._loaded().vae
        spatial = int(vae.spatial_compression_ratio)
        return (vae.temporal_compression_ratio / LTX_FRAME_RATE, spatial, spatial)

    # --- inference ---
    def rendered_image(self, result):
        """The first (only) frame of the first video LTXPipeline rendered (output_type="pil")."""
        return result.frames[0][0]

    def _finish_load(self, components, path: str, device: torch.device, scheduler_config: dict | None = None) -> None:
        super()._finish_load(components, path, device, scheduler_config)
        # A wrapper (DDP, compile) may hide .config; predict reads the patch sizes from this copy.
        components.extras["transformer_config"] = components.denoiser.config
