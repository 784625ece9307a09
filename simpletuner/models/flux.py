"""Flux.1: a rectified-flow transformer over 16-channel VAE latents packed into 2x2 patches.

Conditioning is CLIP-L's pooled vector plus T5-XXL's token sequence; the
guidance-distilled models (dev, krea, schnell's relatives) also take a
guidance number as input. Training follows flow matching: the trainer mixes
``(1 - s) * latents + s * noise`` and the transformer predicts ``noise - latents``.

The base model may also be a single ``.safetensors`` transformer checkpoint
(pretrained_model_name_or_path), in BFL's original layout or diffusers'. The
VAE, text encoders, tokenizers and scheduler then come from the diffusers
folder of the chosen flavour (model_flavour or the default), a hub id or a
local folder, which also describes the transformer's architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

from simpletuner.config.settings import Settings
from simpletuner.data.types import TrainingBatch
from simpletuner.models.base import Components, ModelFamily
from simpletuner.models.flux_lora_targets import FLUX_LORA_TARGETS, flux_lora_targets
from simpletuner.models.load_quantization import gguf_load_kwargs, is_gguf_file
from simpletuner.models.registry import register
from simpletuner.models.locations import local_subfolder
from simpletuner.models.sd import LazyClass
from simpletuner.models.sdxl import is_single_file

MAX_T5_LENGTH = 512  # the longest T5 sequence Flux was trained with
# Pixel sizes must be multiples of 16: the VAE halves three times and Flux packs 2x2 latent patches.
PIXEL_MULTIPLE = 16


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4): each 2x2 patch becomes one token, row by row."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for a latent grid of ``height`` x ``width``."""
    batch, _, packed_channels = tokens.shape
    channels = packed_channels // 4
    patches = tokens.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, channels, height, width)


def latent_image_ids(rows: int, columns: int, device, dtype) -> torch.Tensor:
    """(rows * columns, 3) rotary position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3).to(device=device, dtype=dtype)


@register
class Flux(ModelFamily):
    name = "flux"
    flavours = {
        "krea": "black-forest-labs/FLUX.1-Krea-dev",
        "dev": "black-forest-labs/FLUX.1-dev",
        "schnell": "black-forest-labs/FLUX.1-schnell",
        "fluxbooru": "terminusresearch/fluxbooru-v0.3",
        "libreflux": "jimmycarter/LibreFlux-SimpleTuner",
    }
    # Flavours SimpleTuner offers that need machinery this trainer does not have yet.
    unsupported_flavours = {
        "kontext": "Kontext edit training needs paired conditioning-image datasets and FluxKontextPipeline",
    }
    default_flavour = "krea"
    default_prediction_type = "flow_matching"
    flow_matching = True
    denoiser_subfolder = "transformer"
    gguf_options = ("pretrained_transformer_model_name_or_path", "pretrained_model_name_or_path")
    default_lora_targets = FLUX_LORA_TARGETS["all"]
    pipeline_class = LazyClass("diffusers", "FluxPipeline")
    img2img_pipeline_class = LazyClass("diffusers", "FluxImg2ImgPipeline")
    text_encoder_attributes = ("text_encoder", "text_encoder_2")
    # T5 positions per flavour when tokenizer_max_length is unset (schnell was trained with 256).
    flavour_t5_lengths = {"schnell": 256}

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.has_guidance_input = False  # set by load(): does the transformer take a guidance number?
        self.num_train_timesteps = 1000

    # --- identity ---
    def flavour(self) -> str:
        return self.settings.model_flavour or self.default_flavour

    def t5_max_length(self) -> int:
        """tokenizer_max_length when set, else the flavour's T5 length (512, schnell 256)."""
        if self.settings.tokenizer_max_length:
            return int(self.settings.tokenizer_max_length)
        return self.flavour_t5_lengths.get(self.flavour(), MAX_T5_LENGTH)

    def fingerprint(self) -> str:
        s = self.settings
        identity = [self.name, self.model_path(s), self.config_source(), s.revision, s.variant,
                    s.pretrained_vae_model_name_or_path, s.pretrained_t5_model_name_or_path,
                    self.t5_max_length(), s.t5_padding or "unmodified"]
        digest = hashlib.sha256(json.dumps(identity).encode("utf-8")).hexdigest()
        return f"{self.name}-{digest[:16]}"

    @classmethod
    def check_settings(cls, settings: Settings) -> list[str]:
        problems = cls._model_problems(settings)
        if settings.flux_guidance_mode == "random-range":
            low, high = float(settings.flux_guidance_min), float(settings.flux_guidance_max)
            if not 0 <= low <= high:
                problems.append(f"flux_guidance_min={low} and flux_guidance_max={high} must satisfy "
                                "0 <= min <= max for flux_guidance_mode=random-range")
        if float(settings.flux_guidance_value) < 0:
            problems.append(f"flux_guidance_value={settings.flux_guidance_value} must not be negative "
                            "(1.0 keeps the distilled model's behaviour)")
        length = settings.tokenizer_max_length
        if length is not None and not 1 <= int(length) <= MAX_T5_LENGTH:
            problems.append(f"tokenizer_max_length={length} must be between 1 and {MAX_T5_LENGTH} for Flux's "
                            "T5 encoder; leave it unset for the flavour's length (512, schnell 256)")
        alignment = settings.aspect_bucket_alignment
        if alignment and int(alignment) % PIXEL_MULTIPLE:
            problems.append(f"aspect_bucket_alignment={alignment} makes bucket sides Flux cannot pack into 2x2 "
                            f"latent patches; use 16, 32 or 64")
        return problems

    @classmethod
    def _model_problems(cls, settings: Settings) -> list[str]:
        problems = []
        if settings.prediction_type not in (None, "flow_matching"):
            problems.append(f"prediction_type={settings.prediction_type!r} does not work with model_family=flux, "
                            "a flow-matching model; use flow_matching or leave prediction_type unset")
        flavour = settings.model_flavour
        if flavour in cls.unsupported_flavours:
            problems.append(f"model_flavour={flavour} is not implemented yet: {cls.unsupported_flavours[flavour]}. "
                            f"Choose one of: {', '.join(cls.flavours)}")
        elif flavour and flavour not in cls.flavours:
            problems.append(f"model_flavour={flavour!r} is not a flux flavour; choose one of: "
                            f"{', '.join(cls.flavours)} (or leave it unset and give pretrained_model_name_or_path)")
        if flavour == "libreflux" and not settings.flux_attention_masked_training:
            problems.append("model_flavour=libreflux was trained with masked T5 attention; "
                            "set flux_attention_masked_training=true")
        if flavour == "schnell" and not settings.flux_fast_schedule and not settings.i_know_what_i_am_doing:
            problems.append("model_flavour=schnell is distilled for a few fixed sigmas; set flux_fast_schedule=true "
                            "(or i_know_what_i_am_doing=true to train it on the full schedule)")
        if settings.train_text_encoder:
            problems.append("train_text_encoder is not supported for model_family=flux (CLIP and T5 stay frozen); "
                            "set train_text_encoder to false")
        return problems

    # --- loading ---
    def config_source(self) -> str:
        """Where the VAE, text encoders and scheduler are read: the base model folder, or for a
        single-file checkpoint the diffusers folder of the flavour."""
        path = self.model_path(self.settings)
        return self.flavours[self.flavour()] if is_single_file(path) or is_gguf_file(path) else path

    def load(self, device: torch.device, weight_dtype: torch.dtype) -> Components:
        from diffusers import FlowMatchEulerDiscreteScheduler

        source = self.config_source()
        tokenizers, text_encoders = self._load_text_encoders(source, weight_dtype)
        components = Components(
            denoiser=self._load_transformer(source, weight_dtype),
            vae=self._load_vae(source),
            text_encoders=text_encoders,
            tokenizers=tokenizers,
        )
        revision = {"revision": self.settings.revision} if self.settings.revision else {}
        scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler", **revision)
        components.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        components.extras["inference_scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.num_train_timesteps = int(components.noise_scheduler.config.num_train_timesteps)
        self.has_guidance_input = bool(getattr(components.denoiser.config, "guidance_embeds", False))
        components.vae.requires_grad_(False)
        components.vae.to(device)
        for encoder in text_encoders:
            encoder.requires_grad_(False)
            encoder.eval()
            encoder.to(device)
        components.denoiser.to(device)
        self.components = components
        return components

    def load_text_encoders(self, weight_dtype: torch.dtype) -> list[torch.nn.Module]:
        return self._load_text_encoders(self.config_source(), weight_dtype)[1]

    def _load_transformer(self, source: str, weight_dtype: torch.dtype):
        from diffusers import FluxTransformer2DModel

        custom = self.settings.pretrained_transformer_model_name_or_path
        path = custom or self.model_path(self.settings)
        if is_gguf_file(path):  # quantised already (GGUF); the architecture comes from the config source
            return FluxTransformer2DModel.from_single_file(path, config=source, subfolder="transformer",
                                                           **gguf_load_kwargs(weight_dtype))
        if is_single_file(path):
            if not os.path.isfile(path):
                option = "pretrained_transformer_model_name_or_path" if custom else "pretrained_model_name_or_path"
                raise FileNotFoundError(f"{option}={path!r} looks like a single-file Flux checkpoint but does not "
                                        "exist; fix the path")
            return FluxTransformer2DModel.from_single_file(path, config=source, subfolder="transformer",
                                                           torch_dtype=weight_dtype)
        quantization = self.quantization_load_kwargs("transformer", weight_dtype)
        if custom:
            subfolder = self.settings.pretrained_transformer_subfolder or "transformer"
            subfolder = None if subfolder == "none" else local_subfolder(custom, subfolder)
            return FluxTransformer2DModel.from_pretrained(custom, subfolder=subfolder, torch_dtype=weight_dtype,
                                                          **quantization)
        return FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=weight_dtype,
                                                      **self._pretrained_kwargs(), **quantization)

    def _load_text_encoders(self, source: str, weight_dtype: torch.dtype) -> tuple[list, list]:
        """CLIP-L and T5 with their tokenizers; pretrained_t5_model_name_or_path replaces the T5 weights.

        That location may be a Flux-style repository or folder (T5 under text_encoder_2/)
        or a folder holding the T5 model itself.
        """
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        revision = {"revision": self.settings.revision} if self.settings.revision else {}
        tokenizers = [
            CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **revision),
            T5TokenizerFast.from_pretrained(source, subfolder="tokenizer_2", **revision),
        ]
        t5_source = self.settings.pretrained_t5_model_name_or_path
        if t5_source:
            subfolder = local_subfolder(t5_source, "text_encoder_2") or ""  # transformers wants "" for the root
            t5 = T5EncoderModel.from_pretrained(t5_source, subfolder=subfolder, dtype=weight_dtype,
                                                **self.quantization_load_kwargs("text_encoder_2", weight_dtype))
        else:
            t5 = T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2", dtype=weight_dtype,
                                                **self._pretrained_kwargs(),
                                                **self.quantization_load_kwargs("text_encoder_2", weight_dtype))
        clip = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=weight_dtype,
                                             **self._pretrained_kwargs(),
                                             **self.quantization_load_kwargs("text_encoder", weight_dtype))
        return tokenizers, [clip, t5]

    def _loaded(self) -> Components:
        if self.components is None:
            raise RuntimeError(f"{self.name}: call load() before using the model")
        return self.components

    # --- encoders ---
    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """CLIP-L's pooled vector, T5's hidden states and T5's attention mask (1 = real token).

        The mask is always stored so flux_attention_masked_training can be switched
        without re-encoding; t5_padding=zero sets the padded positions' embeddings to 0.
        """
        components = self._loaded()
        clip_tokenizer, t5_tokenizer = components.tokenizers
        clip, t5 = components.text_encoders
        prompts = list(prompts)
        with torch.no_grad():
            clip_ids = clip_tokenizer(prompts, padding="max_length", max_length=clip_tokenizer.model_max_length,
                                      truncation=True, return_tensors="pt").input_ids
            pooled = clip(clip_ids.to(clip.device), output_hidden_states=False).pooler_output
            t5_inputs = t5_tokenizer(prompts, padding="max_length", max_length=self.t5_max_length(),
                                     truncation=True, return_tensors="pt")
            mask = t5_inputs.attention_mask.to(t5.device)
            embeds = t5(t5_inputs.input_ids.to(t5.device), output_hidden_states=False)[0]
            if self.settings.t5_padding == "zero":
                embeds = embeds * mask.unsqueeze(-1).to(embeds.dtype)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "prompt_attention_mask": mask}

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(VAE posterior mean - shift_factor) * scaling_factor; the mean keeps cached latents reproducible."""
        vae = self._loaded().vae
        with torch.no_grad():
            latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self._loaded().vae
        scaled = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        with torch.no_grad():
            return vae.decode(scaled).sample.clamp(-1, 1)

    # --- training ---
    def lora_target_modules(self) -> list[str]:
        targets = flux_lora_targets(self.settings.flux_lora_target)
        if self.settings.control and "x_embedder" not in targets:  # the only layer reading the control latents
            targets.append("x_embedder")
        return targets

    def guidance_vector(self, batch_size: int, timesteps: torch.Tensor) -> torch.Tensor | None:
        """The guidance number per sample, or None when the transformer has no guidance input.

        random-range draws uniformly in [flux_guidance_min, flux_guidance_max]. The draw
        is seeded from the run's seed and this step's timesteps (themselves drawn from
        the step's seeded generator), so a resumed run repeats it exactly.
        """
        if not self.has_guidance_input:
            return None
        if self.settings.flux_guidance_mode != "random-range":
            return torch.full((batch_size,), float(self.settings.flux_guidance_value))
        digest = hashlib.sha256(timesteps.detach().float().cpu().numpy().tobytes())
        digest.update(str(self.settings.seed or 0).encode("utf-8"))
        generator = torch.Generator().manual_seed(int.from_bytes(digest.digest()[:8], "little") % (2**63))
        low, high = float(self.settings.flux_guidance_min), float(self.settings.flux_guidance_max)
        return low + (high - low) * torch.rand(batch_size, generator=generator)

    def attention_kwargs(self, text: dict[str, torch.Tensor], image_tokens: int, device) -> dict | None:
        """With flux_attention_masked_training, a boolean mask hiding T5 padding from every query."""
        if not self.settings.flux_attention_masked_training:
            return None
        text_mask = text.get("prompt_attention_mask")
        if text_mask is None:
            raise ValueError("flux_attention_masked_training needs the T5 attention mask, but the cached text "
                             "embeds have none; delete the text embed cache so it is rebuilt")
        image_mask = torch.ones(text_mask.shape[0], image_tokens, dtype=torch.bool, device=device)
        mask = torch.cat([text_mask.to(device=device).bool(), image_mask], dim=1)
        return {"attention_mask": mask[:, None, None, :]}  # (B, 1, 1, text + image): broadcast over heads, queries

    def predict(self, batch: TrainingBatch, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The velocity prediction for ``noisy_latents`` (B, 16, H, W) at ``timesteps`` = sigma * 1000.

        Runs in the dtype of ``noisy_latents``; ``components.denoiser`` may be a wrapper (DDP, compile).
        """
        device, dtype = noisy_latents.device, noisy_latents.dtype
        batch_size, _, height, width = noisy_latents.shape
        if height % 2 or width % 2:
            raise ValueError(f"Flux packs 2x2 latent patches, but a batch has a {height}x{width} latent grid; "
                             f"use bucket sizes that are multiples of {PIXEL_MULTIPLE} pixels")
        embeds = batch.text["prompt_embeds"].to(device=device, dtype=dtype)
        guidance = self.guidance_vector(batch_size, timesteps)
        hidden = pack_latents(noisy_latents)
        if self.settings.control:  # channel control: each token also carries its packed control latents
            from simpletuner.training.channel_control import with_control_tokens

            hidden = with_control_tokens(hidden, batch)
        tokens = self._loaded().denoiser(
            hidden_states=hidden,
            encoder_hidden_states=embeds,
            pooled_projections=batch.text["pooled_prompt_embeds"].to(device=device, dtype=dtype),
            timestep=(timesteps.float() / self.num_train_timesteps).to(device=device, dtype=dtype),
            guidance=None if guidance is None else guidance.to(device=device, dtype=dtype),
            img_ids=latent_image_ids(height // 2, width // 2, device, dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            joint_attention_kwargs=self.attention_kwargs(batch.text, (height // 2) * (width // 2), device),
            return_dict=False,
            **self.control_kwargs(batch),
        )[0]
        return unpack_latents(tokens, height, width)

    # --- inference and saving ---
    def build_pipeline(self, denoiser: torch.nn.Module | None = None, *, img2img: bool = False, **overrides):
        """A FluxPipeline (or FluxImg2ImgPipeline) over the loaded parts; ``overrides`` replace arguments."""
        components = self._loaded()
        scheduler = components.extras["inference_scheduler"]
        parts: dict[str, Any] = {
            "scheduler": type(scheduler).from_config(scheduler.config),  # a copy: pipelines mutate it
            "vae": components.vae,
            "text_encoder": components.text_encoders[0],
            "tokenizer": components.tokenizers[0],
            "text_encoder_2": components.text_encoders[1],
            "tokenizer_2": components.tokenizers[1],
            "transformer": denoiser if denoiser is not None else components.denoiser,
        }
        parts.update(overrides)
        pipeline_class = self.img2img_pipeline_class if img2img else self.pipeline_class
        return pipeline_class(**parts)

    def save_lora(self, output_dir: str, denoiser_lora_state: dict[str, torch.Tensor],
                  text_encoder_lora_states: dict[str, dict[str, torch.Tensor]] | None = None,
                  adapter_metadata: dict[str, dict] | None = None) -> None:
        """Write pytorch_lora_weights.safetensors that FluxPipeline.load_lora_weights reads.

        ``denoiser_lora_state`` is the transformer's PEFT state dict, saved with PEFT
        key names (what diffusers' Flux loader expects); ``adapter_metadata["transformer"]``
        (a LoraConfig dict) records lora_alpha so loaders scale the adapter correctly.
        """
        if text_encoder_lora_states:
            raise ValueError("Flux LoRAs here train only the transformer; text encoder adapters cannot be saved")
        metadata = adapter_metadata or {}
        unknown = set(metadata) - {self.denoiser_subfolder}
        if unknown:
            raise ValueError(f"flux has no component(s) {sorted(unknown)} to save adapter metadata for; "
                             "only 'transformer'")
        arguments: dict[str, Any] = {"transformer_lora_layers": denoiser_lora_state}
        if self.denoiser_subfolder in metadata:
            arguments["transformer_lora_adapter_metadata"] = metadata[self.denoiser_subfolder]
        os.makedirs(output_dir, exist_ok=True)
        self.pipeline_class.save_lora_weights(output_dir, safe_serialization=True, **arguments)
