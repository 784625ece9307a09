"""Stable Diffusion 1.x and 2.x: a UNet denoising 4-channel VAE latents, conditioned on one CLIP encoder.

``UNetLatentFamily`` holds what every Stable Diffusion style family shares
(VAE, UNet, DDPM training schedule, pipelines, LoRA saving); sd1x and sd2x
add their text encoder and defaults, and sdxl.py builds on the same base.

diffusers and transformers are imported where they are used, so importing a
family (for ``check_settings``) costs no more than torch.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from typing import Any

import torch

from simpletuner.config.settings import Settings
from simpletuner.data.types import TrainingBatch
from simpletuner.models.base import Components, ModelFamily
from simpletuner.models.locations import local_subfolder, vae_dtype_for
from simpletuner.models.registry import register

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LazyClass:
    """A class attribute that names a class and imports its module on first access."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __get__(self, instance, owner) -> type:
        return getattr(importlib.import_module(self.module), self.name)


def one_key_layout(peft_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PEFT LoRA state in diffusers' key layout, or left in PEFT's when diffusers' converter cannot rename every key.

    The converter renames only the attention projections (to_q/to_k/to_v/to_out.0, q/k/v/out_proj) to
    diffusers' ``lora.down``/``lora.up`` names. The loaders pick one layout from the first key, so a file
    mixing both (e.g. peft_lora_target_modules adding proj_in or add_k_proj) would silently lose layers.
    """
    from diffusers.utils import convert_state_dict_to_diffusers

    converted = convert_state_dict_to_diffusers(dict(peft_state))
    if any(".lora_A." in key or ".lora_B." in key for key in converted):
        return dict(peft_state)
    return converted


class UNetLatentFamily(ModelFamily):
    """Shared behaviour of the UNet + AutoencoderKL + CLIP families. Not registered itself."""

    default_lora_targets = UNET_LORA_TARGETS
    text_encoder_attributes = ("text_encoder",)
    supports_text_encoder_training = True
    valid_prediction_types = ("epsilon", "v_prediction", "sample")

    # --- identity ---
    def fingerprint(self) -> str:
        s = self.settings
        identity = [self.name, self.model_path(s), s.revision, s.variant, s.pretrained_vae_model_name_or_path]
        digest = hashlib.sha256(json.dumps(identity).encode("utf-8")).hexdigest()
        return f"{self.name}-{digest[:16]}"

    @classmethod
    def check_settings(cls, settings: Settings) -> list[str]:
        problems = []
        if settings.prediction_type and settings.prediction_type not in cls.valid_prediction_types:
            problems.append(
                f"prediction_type={settings.prediction_type!r} does not work with model_family={cls.name}; "
                f"use one of {', '.join(cls.valid_prediction_types)} or leave it unset for the model's default"
            )
        flavour = settings.model_flavour
        if flavour and flavour not in cls.flavours:
            problems.append(
                f"model_flavour={flavour!r} is not a {cls.name} flavour; choose one of: {', '.join(cls.flavours)} "
                "(or leave it unset and give pretrained_model_name_or_path)"
            )
        return problems

    # --- loading ---
    def load(self, device: torch.device, weight_dtype: torch.dtype) -> Components:
        path = self.model_path(self.settings)
        tokenizers, text_encoders = self._load_text_encoders(path, weight_dtype)
        components = Components(
            denoiser=self._load_unet(path, weight_dtype),
            vae=self._load_vae(path),
            text_encoders=text_encoders,
            tokenizers=tokenizers,
        )
        self._finish_load(components, path, device)
        return components

    def load_text_encoders(self, weight_dtype: torch.dtype) -> list[torch.nn.Module]:
        path = self.model_path(self.settings)
        if os.path.isfile(path):
            raise NotImplementedError(f"the text encoders inside the single-file checkpoint {path} cannot be "
                                      "loaded on their own")
        return self._load_text_encoders(path, weight_dtype)[1]

    def single_file_config(self) -> str:
        """The diffusers folder (hub id or local path) that describes a single-file checkpoint's architecture."""
        return self.flavours[self.settings.model_flavour or self.default_flavour]

    def _single_file_parts(self, path: str, weight_dtype: torch.dtype, load_denoiser) -> tuple[str, dict[str, Any]]:
        """(architecture folder, parts loaded apart from a single-file pipeline) for families that read one.

        The VAE loads on its own so it is read straight into its dtype (fp32 unless vae_dtype says
        otherwise); so does the denoiser when its own location replaces the file's (``load_denoiser``).
        """
        from diffusers import AutoencoderKL

        config = self.single_file_config()
        if self.settings.pretrained_vae_model_name_or_path:
            vae = self._load_vae(config)
        else:
            vae = AutoencoderKL.from_single_file(path, config=config, subfolder="vae",
                                                 torch_dtype=vae_dtype_for(self.settings.vae_dtype))
        parts: dict[str, Any] = {"vae": vae}
        if getattr(self.settings, f"pretrained_{self.denoiser_subfolder}_model_name_or_path"):
            parts[self.denoiser_subfolder] = load_denoiser(config, weight_dtype)
        return config, parts

    def _load_text_encoders(self, path: str, weight_dtype: torch.dtype) -> tuple[list, list]:
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer, encoder = self._load_encoder_pair(path, CLIPTokenizer, CLIPTextModel, weight_dtype)
        return [tokenizer], [encoder]

    def _load_unet(self, path: str, weight_dtype: torch.dtype):
        from diffusers import UNet2DConditionModel

        subfolder = self.settings.pretrained_unet_subfolder or "unet"
        custom = self.settings.pretrained_unet_model_name_or_path
        quantization = self.quantization_load_kwargs("unet", weight_dtype)
        if custom:
            return UNet2DConditionModel.from_pretrained(
                custom, subfolder=local_subfolder(custom, subfolder), torch_dtype=weight_dtype, **quantization
            )
        return UNet2DConditionModel.from_pretrained(
            path, subfolder=subfolder, torch_dtype=weight_dtype, **self._pretrained_kwargs(), **quantization
        )

    def _finish_load(self, components: Components, path: str, device: torch.device,
                     scheduler_config: dict | None = None) -> None:
        """Schedulers, freezing and device placement shared by every way of loading.

        ``scheduler_config`` is read from ``path``/scheduler unless given.
        """
        from diffusers import DDPMScheduler

        if scheduler_config is None:
            revision = {"revision": self.settings.revision} if self.settings.revision else {}
            scheduler_config = DDPMScheduler.load_config(path, subfolder="scheduler", **revision)
        components.noise_scheduler = self._training_scheduler(scheduler_config)
        components.extras["inference_scheduler"] = self._inference_scheduler(scheduler_config)
        if components.vae is not None:  # pixel-space families (DeepFloyd IF) have none
            components.vae.requires_grad_(False)
            components.vae.to(device)
        for encoder in components.text_encoders:
            encoder.requires_grad_(False)
            encoder.eval()
            encoder.to(device)
        components.denoiser.to(device)
        self.components = components

    def _training_scheduler(self, scheduler_config: dict):
        """DDPM with the model's betas, our prediction type and the training schedule options."""
        from diffusers import DDPMScheduler

        changes: dict[str, Any] = {
            "prediction_type": self.prediction_type(),
            "rescale_betas_zero_snr": bool(self.settings.rescale_betas_zero_snr),
        }
        if self.settings.training_scheduler_timestep_spacing:
            changes["timestep_spacing"] = self.settings.training_scheduler_timestep_spacing
        return DDPMScheduler.from_config({**scheduler_config, **changes})

    def _inference_scheduler(self, scheduler_config: dict):
        """The scheduler class the model ships (PNDM, DDIM, Euler ...), set to our prediction type."""
        import diffusers

        scheduler_class = getattr(diffusers, scheduler_config.get("_class_name", ""), None)
        if scheduler_class is None:
            scheduler_class = diffusers.EulerDiscreteScheduler
        accepted = set(scheduler_class._get_init_keys(scheduler_class))
        changes: dict[str, Any] = {"prediction_type": self.prediction_type()}
        if self.settings.inference_scheduler_timestep_spacing:
            changes["timestep_spacing"] = self.settings.inference_scheduler_timestep_spacing
        if self.settings.rescale_betas_zero_snr:
            changes["rescale_betas_zero_snr"] = True
        changes = {key: value for key, value in changes.items() if key in accepted}
        return scheduler_class.from_config({**scheduler_config, **changes})

    def _loaded(self) -> Components:
        if self.components is None:
            raise RuntimeError(f"{self.name}: call load() before using the model")
        return self.components

    # --- encoders ---
    @staticmethod
    def _tokenize(tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
        tokens = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        return tokens.input_ids.to(device)

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """CLIP's final hidden states (after its last layer norm), as the SD pipelines use them.

        tokenizer_max_length does not apply: CLIP has exactly 77 positions.
        """
        with torch.no_grad():
            return self.encode_text_for_training(prompts)

    def encode_text_for_training(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``encode_text`` keeping the autograd graph, so trained text encoders get gradients."""
        if not self.supports_text_encoder_training:
            raise NotImplementedError(f"model_family={self.name} cannot train its text encoders")
        components = self._loaded()
        tokenizer, encoder = components.tokenizers[0], components.text_encoders[0]
        ids = self._tokenize(tokenizer, list(prompts), encoder.device)
        return {"prompt_embeds": encoder(ids)[0]}

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior mean times the scaling factor.

        The mean (not a sample) keeps cached latents reproducible; the SD VAEs'
        posterior spread is tiny, so training sees no practical difference.
        """
        vae = self._loaded().vae
        with torch.no_grad():
            posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
            latents = posterior.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents from ``encode_images`` back to pixels in [-1, 1] (B,3,H,W)."""
        vae = self._loaded().vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        scaled = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift
        with torch.no_grad():
            return vae.decode(scaled).sample.clamp(-1, 1)

    # --- training ---
    def _added_conditions(self, batch: TrainingBatch, dtype: torch.dtype, device: torch.device) -> dict | None:
        return None

    def predict(self, batch: TrainingBatch, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Runs ``components.denoiser`` in the dtype of ``noisy_latents`` (the caller's compute dtype).

        The dtype is not read from the module, so the denoiser may be a wrapper
        (DDP, torch.compile) that the trainer put in ``components.denoiser``.
        """
        components = self._loaded()
        device, dtype = noisy_latents.device, noisy_latents.dtype
        sample = noisy_latents
        if self.settings.control:  # channel control (InstructPix2Pix layout): control latents follow the noisy ones
            from simpletuner.training.channel_control import with_control_channels

            sample = with_control_channels(noisy_latents, batch, components.vae.config)
        return components.denoiser(
            sample,
            timesteps.to(device),
            encoder_hidden_states=batch.text["prompt_embeds"].to(device=device, dtype=dtype),
            added_cond_kwargs=self._added_conditions(batch, dtype, device),
            return_dict=False,
            **self.control_kwargs(batch),
        )[0]

    # --- inference and saving ---
    def _pipeline_parts(self, denoiser: torch.nn.Module | None) -> dict[str, Any]:
        components = self._loaded()
        return {
            "vae": components.vae,
            "text_encoder": components.text_encoders[0],
            "tokenizer": components.tokenizers[0],
            "unet": denoiser if denoiser is not None else components.denoiser,
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }

    def build_pipeline(self, denoiser: torch.nn.Module | None = None, *, img2img: bool = False, **overrides):
        """A pipeline over the loaded parts; ``overrides`` replace constructor arguments (e.g. scheduler)."""
        scheduler = self._loaded().extras["inference_scheduler"]
        parts = self._pipeline_parts(denoiser)
        parts["scheduler"] = type(scheduler).from_config(scheduler.config)  # a copy: pipelines mutate it
        parts.update(overrides)
        pipeline_class = self.img2img_pipeline_class if img2img else self.pipeline_class
        return pipeline_class(**parts)

    def save_lora(self, output_dir: str, denoiser_lora_state: dict[str, torch.Tensor],
                  text_encoder_lora_states: dict[str, dict[str, torch.Tensor]] | None = None,
                  adapter_metadata: dict[str, dict] | None = None) -> None:
        """Write pytorch_lora_weights.safetensors in the diffusers layout.

        ``denoiser_lora_state`` (and each text encoder's) is a PEFT state dict
        (``get_peft_model_state_dict``). ``adapter_metadata`` optionally maps
        "unet" / a text encoder attribute to its ``LoraConfig.to_dict()`` so the
        file records lora_alpha; without it loaders assume alpha == rank.
        """
        text_states = text_encoder_lora_states or {}
        metadata = adapter_metadata or {}
        unknown = (set(text_states) | set(metadata)) - set(self.text_encoder_attributes) - {"unet"}
        if unknown:
            raise ValueError(
                f"{self.name} has no component(s) {sorted(unknown)}; "
                f"text encoders are {list(self.text_encoder_attributes)}"
            )
        arguments: dict[str, Any] = {"unet_lora_layers": one_key_layout(denoiser_lora_state)}
        if "unet" in metadata:
            arguments["unet_lora_adapter_metadata"] = metadata["unet"]
        for attribute, state in text_states.items():
            arguments[f"{attribute}_lora_layers"] = one_key_layout(state)
            if attribute in metadata:
                arguments[f"{attribute}_lora_adapter_metadata"] = metadata[attribute]
        os.makedirs(output_dir, exist_ok=True)
        self.pipeline_class.save_lora_weights(output_dir, safe_serialization=True, **arguments)


@register
class StableDiffusion1(UNetLatentFamily):
    """SD 1.x: CLIP ViT-L/14 text encoder, epsilon prediction, 512px."""

    name = "sd1x"
    flavours = {
        "1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "1.4": "CompVis/stable-diffusion-v1-4",
        "dreamshaper": "Lykon/dreamshaper-8",
    }
    default_flavour = "dreamshaper"  # SimpleTuner's default for sd1x
    default_prediction_type = "epsilon"
    pipeline_class = LazyClass("diffusers", "StableDiffusionPipeline")
    img2img_pipeline_class = LazyClass("diffusers", "StableDiffusionImg2ImgPipeline")


@register
class StableDiffusion2(StableDiffusion1):
    """SD 2.x: OpenCLIP ViT-H/14 text encoder; the 768px models predict v, the 512px "base" ones epsilon."""

    name = "sd2x"
    flavours = {
        "pseudoflex-v2": "bghira/pseudo-flex-v2",
        "pseudojourney": "bghira/pseudo-journey-v2",
        "digitaldiffusion": "Junglerally/Digital-Diffusion",
        "2.1": "stabilityai/stable-diffusion-2-1",
        "2.1-base": "stabilityai/stable-diffusion-2-1-base",
        "2.0": "stabilityai/stable-diffusion-2",
        "2.0-base": "stabilityai/stable-diffusion-2-base",
    }
    default_flavour = "pseudoflex-v2"  # SimpleTuner's default for sd2x
    default_prediction_type = "v_prediction"
    # Flavours whose prediction type differs from the family default.
    flavour_prediction_types = {"2.1-base": "epsilon", "2.0-base": "epsilon"}

    def prediction_type(self) -> str:
        """prediction_type when set; otherwise the flavour's (model_flavour or the default flavour)."""
        if self.settings.prediction_type:
            return self.settings.prediction_type
        flavour = self.settings.model_flavour or self.default_flavour
        return self.flavour_prediction_types.get(flavour, self.default_prediction_type)
