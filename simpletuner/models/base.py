"""The small interface every model family implements.

A family declares its facts as class attributes and implements a handful of
methods; everything shared (noise, losses, LoRA plumbing, checkpoints) lives
in training/. Families never mutate the config, print warnings about it or
exit: ``check_settings`` returns problems and the caller decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from simpletuner.config.settings import Settings
from simpletuner.data.types import TrainingBatch


@dataclass
class Components:
    """Loaded model parts. ``text_encoders``/``tokenizers`` are in slot order (1, 2, ...)."""

    denoiser: torch.nn.Module  # the UNet or transformer that is trained
    vae: torch.nn.Module | None
    text_encoders: list[torch.nn.Module] = field(default_factory=list)
    tokenizers: list[Any] = field(default_factory=list)
    noise_scheduler: Any = None  # the training scheduler (DDPMScheduler / FlowMatchEulerDiscreteScheduler)
    extras: dict[str, Any] = field(default_factory=dict)


class ModelFamily:
    # --- facts, declared by each family ---
    name: ClassVar[str]  # the model_family value, e.g. "sdxl"
    flavours: ClassVar[dict[str, str]]  # model_flavour -> default hub id or path
    default_flavour: ClassVar[str]
    default_prediction_type: ClassVar[str]  # epsilon | v_prediction | sample | flow_matching
    flow_matching: ClassVar[bool] = False
    denoiser_subfolder: ClassVar[str] = "unet"  # "unet" or "transformer"
    # The diffusers class of the VAE; None for a pixel-space family (DeepFloyd IF): Components.vae is None,
    # encode_images/decode_latents are the identity and the latent cache holds the images in [-1, 1].
    vae_class_name: ClassVar[str | None] = "AutoencoderKL"
    # Latent pixels per side of one transformer token (2x2 patches for most; Sana and LTX-Video use 1x1).
    latent_patch_size: ClassVar[int] = 2
    # Whether the pipeline's load_lora_weights reads lora_format=comfyui files (their ".alpha" keys).
    diffusers_loads_comfyui_lora: ClassVar[bool] = True
    # Options that may name a .gguf denoiser file, which the family's loader reads (load_quantization.py).
    gguf_options: ClassVar[tuple[str, ...]] = ()
    default_lora_targets: ClassVar[tuple[str, ...]] = ()
    pipeline_class: ClassVar[type]  # diffusers text-to-image pipeline
    img2img_pipeline_class: ClassVar[type | None] = None
    # Which text encoder slots can be trained (train_text_encoder) and the attribute
    # names the pipeline uses for them, e.g. ("text_encoder", "text_encoder_2").
    text_encoder_attributes: ClassVar[tuple[str, ...]] = ()
    supports_text_encoder_training: ClassVar[bool] = False

    def __init__(self, settings: Settings):
        self.settings = settings
        self.components: Components | None = None

    # --- identity ---
    @classmethod
    def model_path(cls, settings: Settings) -> str:
        """The base model location: pretrained_model_name_or_path or the flavour's default."""
        if settings.pretrained_model_name_or_path:
            return settings.pretrained_model_name_or_path
        flavour = settings.model_flavour or cls.default_flavour
        return cls.flavours[flavour]

    def prediction_type(self) -> str:
        return self.settings.prediction_type or self.default_prediction_type

    def fingerprint(self) -> str:
        """Identifies what produced cached tensors: changes when the base model, VAE or text encoders change."""
        raise NotImplementedError

    @classmethod
    def check_settings(cls, settings: Settings) -> list[str]:
        """Problems with settings for this family, as messages naming the option and the fix. No I/O."""
        return []

    # --- loading ---
    def load(self, device: torch.device, weight_dtype: torch.dtype) -> Components:
        """Load all parts through from_pretrained (hub id, local folder or single file)."""
        raise NotImplementedError

    def load_text_encoders(self, weight_dtype: torch.dtype) -> list[torch.nn.Module]:
        """The text encoders loaded again from where ``load`` read them, in slot order, on the CPU.

        fully_unload_text_encoder (training/unloading.py) calls this when validation or a pipeline save
        needs encoders it unloaded. A family that cannot raises NotImplementedError saying why.
        """
        raise NotImplementedError(f"model_family={self.name} cannot load its text encoders on their own")

    def quantization_load_kwargs(self, component: str, dtype: torch.dtype) -> dict:
        """Keywords that quantise ``component`` (``unet``/``transformer`` or a text encoder attribute such as
        ``text_encoder_2``) inside its from_pretrained call: empty unless quantize_via=pipeline asks for it."""
        from simpletuner.models.load_quantization import load_kwargs

        return load_kwargs(self, component, dtype)

    def _pretrained_kwargs(self) -> dict[str, Any]:
        """revision/variant for the parts read from the base model location."""
        return {key: getattr(self.settings, key) for key in ("revision", "variant") if getattr(self.settings, key)}

    def _load_encoder_pair(self, path: str, tokenizer_class, encoder_class, weight_dtype: torch.dtype,
                           encoder_subfolder: str = "text_encoder", tokenizer_subfolder: str = "tokenizer"):
        """(tokenizer, text encoder) from the base model's folders, with revision/variant and the encoder's
        load-time quantisation (quantize_via=pipeline)."""
        revision = {"revision": self.settings.revision} if self.settings.revision else {}
        tokenizer = tokenizer_class.from_pretrained(path, subfolder=tokenizer_subfolder, **revision)
        encoder = encoder_class.from_pretrained(path, subfolder=encoder_subfolder, dtype=weight_dtype,
                                                **self._pretrained_kwargs(),
                                                **self.quantization_load_kwargs(encoder_subfolder, weight_dtype))
        return tokenizer, encoder

    def _load_replaceable_t5(self, path: str, weight_dtype: torch.dtype):
        """(tokenizer, T5 encoder) from pretrained_t5_model_name_or_path when set (laid out like the base model,
        or a plain T5 folder), else from the base model's tokenizer/ and text_encoder/ folders."""
        from transformers import AutoTokenizer, T5EncoderModel

        from simpletuner.models.locations import local_subfolder

        custom = self.settings.pretrained_t5_model_name_or_path
        if not custom:
            return self._load_encoder_pair(path, AutoTokenizer, T5EncoderModel, weight_dtype)
        tokenizer = AutoTokenizer.from_pretrained(custom, subfolder=local_subfolder(custom, "tokenizer") or "")
        encoder = T5EncoderModel.from_pretrained(custom, subfolder=local_subfolder(custom, "text_encoder") or "",
                                                 dtype=weight_dtype,
                                                 **self.quantization_load_kwargs("text_encoder", weight_dtype))
        return tokenizer, encoder

    def _load_vae(self, source: str):
        """The VAE (class ``vae_class_name``) from pretrained_vae_model_name_or_path, else ``source``'s vae/."""
        import diffusers

        from simpletuner.models.locations import local_subfolder, vae_dtype_for

        vae_class = getattr(diffusers, self.vae_class_name)
        dtype = vae_dtype_for(self.settings.vae_dtype)
        custom = self.settings.pretrained_vae_model_name_or_path
        if custom:
            return vae_class.from_pretrained(custom, subfolder=local_subfolder(custom, "vae"), torch_dtype=dtype)
        return vae_class.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **self._pretrained_kwargs())

    # --- encoders (used by the caches) ---
    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Text-encoder outputs for a list of prompts; every tensor has the batch dim first."""
        raise NotImplementedError

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B,3,H,W) in [-1, 1] -> latents already multiplied by the VAE's scaling (and shifted)."""
        raise NotImplementedError

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- training ---
    def lora_target_modules(self) -> list[str]:
        """Module names a PEFT LoRA wraps by default; families whose preset depends on settings override this."""
        return list(self.default_lora_targets)

    def predict(self, batch: TrainingBatch, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The denoiser's output for noisy latents at timesteps, conditioned on batch.text and micro-conditioning."""
        raise NotImplementedError

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Image tokens the denoiser sees for ``latents`` (..., H, W): what flow_schedule_auto_shift scales by."""
        patch = self.latent_patch_size
        return (latents.shape[-2] // patch) * (latents.shape[-1] // patch)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """An extra term the latest ``predict`` adds to the training loss (e.g. a router balance term), or None."""
        return None

    def control_kwargs(self, batch: TrainingBatch) -> dict:
        """The ControlNet input a batch carries, as the extra keyword of a ControlNet-wrapped denoiser.

        Families pass it along in their denoiser call; without conditioning data it is empty.
        (training/controlnet_model.py: ``ControlledDenoiser``.) A control=true run widens the
        denoiser's input instead (training/channel_control.py), so it passes nothing here.
        """
        if self.settings.control:
            return {}
        control = batch.conditioning_latents if batch.conditioning_latents is not None else batch.conditioning_pixels
        return {} if control is None else {"control": control}

    # --- inference and saving ---
    def pipeline_call_arguments(self) -> dict:
        """Keyword arguments a pipeline call needs to encode prompts the way training did (e.g. text length)."""
        return {}

    def rendered_image(self, result) -> Any:
        """The PIL image a pipeline call (output_type="pil") rendered; video families return a frame of it."""
        return result.images[0]

    def build_pipeline(self, denoiser: torch.nn.Module | None = None, **overrides):
        """A diffusers pipeline from loaded components (denoiser replaced when given)."""
        raise NotImplementedError

    def save_lora(self, output_dir: str, denoiser_lora_state: dict[str, torch.Tensor],
                  text_encoder_lora_states: dict[str, dict[str, torch.Tensor]] | None = None,
                  adapter_metadata: dict[str, dict] | None = None) -> None:
        """Write pytorch_lora_weights.safetensors that pipeline_class.load_lora_weights accepts.

        adapter_metadata maps "unet"/"transformer" (or a text encoder attribute) to its LoraConfig dict,
        so loaders apply the trained lora_alpha rather than assuming alpha == rank.
        """
        raise NotImplementedError
