"""PixArt Sigma: a DiT denoising 4-channel SDXL-VAE latents, conditioned on T5 with an attention mask.

It is trained like Stable Diffusion (DDPM noise schedule, epsilon by default),
so it builds on ``UNetLatentFamily`` for the VAE, schedulers and pipelines.

Helpers shared with the Gemma families (sana.py, lumina2.py) live here too:
loading a transformer that may come from its own location, bucket-alignment
checks, and encoding prompts through the family's own diffusers pipeline so
cached embeddings are exactly what inference computes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar

import torch

from simpletuner.config.settings import Settings
from simpletuner.data.types import TrainingBatch
from simpletuner.models.base import Components
from simpletuner.models.load_quantization import gguf_load_kwargs, is_gguf_file
from simpletuner.models.registry import register
from simpletuner.models.locations import local_subfolder
from simpletuner.models.sd import LazyClass, UNetLatentFamily

ATTENTION_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PIXART_PROMPT_LENGTH = 300  # T5 tokens, as PixArt Sigma was trained
class TransformerFamilyLoading:
    """``load`` for a family made of ``transformer_class`` (load_transformer), a VAE and the text encoders its
    ``_load_text_encoders(path, weight_dtype) -> (tokenizers, encoders)`` reads (PixArt, Sana, Lumina2,
    Qwen-Image)."""

    def load(self, device: torch.device, weight_dtype: torch.dtype) -> Components:
        path = self.model_path(self.settings)
        tokenizers, text_encoders = self._load_text_encoders(path, weight_dtype)
        components = Components(
            denoiser=load_transformer(self.settings, self.transformer_class, path, weight_dtype,
                                      self._pretrained_kwargs(),
                                      self.quantization_load_kwargs("transformer", weight_dtype)),
            vae=self._load_vae(path),
            text_encoders=text_encoders,
            tokenizers=tokenizers,
        )
        self._finish_load(components, path, device)
        return components

    def load_text_encoders(self, weight_dtype: torch.dtype) -> list[torch.nn.Module]:
        return self._load_text_encoders(self.model_path(self.settings), weight_dtype)[1]


# PixArt Sigma has no resolution / aspect-ratio embedding; its pipeline passes these as None.
SIGMA_ADDED_CONDITIONS = {"resolution": None, "aspect_ratio": None}


# --- helpers shared by the transformer families in this file, sana.py and lumina2.py ---
def load_transformer(settings: Settings, model_class, path: str, weight_dtype: torch.dtype,
                     pretrained_kwargs: dict[str, Any], quantization: dict[str, Any] | None = None):
    """The denoiser from pretrained_transformer_model_name_or_path, or from the base model's transformer folder.

    pretrained_transformer_subfolder names the folder inside that source ("none": the top level). A .gguf
    file is read quantised, its architecture from the base model's transformer folder; ``quantization``
    (ModelFamily.quantization_load_kwargs) quantises other sources while they load.
    """
    subfolder = settings.pretrained_transformer_subfolder or "transformer"
    subfolder = None if subfolder == "none" else subfolder
    custom = settings.pretrained_transformer_model_name_or_path
    quantization = quantization or {}
    if is_gguf_file(custom):
        return model_class.from_single_file(custom, config=path, subfolder="transformer",
                                            **gguf_load_kwargs(weight_dtype))
    if custom:
        return model_class.from_pretrained(custom, subfolder=local_subfolder(custom, subfolder),
                                           torch_dtype=weight_dtype, **quantization)
    return model_class.from_pretrained(path, subfolder=subfolder, torch_dtype=weight_dtype, **pretrained_kwargs,
                                       **quantization)


def alignment_problem(settings: Settings, family: str, pixels: int, why: str) -> list[str]:
    """A message when aspect_bucket_alignment does not produce sides the denoiser can cut into patches."""
    alignment = settings.aspect_bucket_alignment
    if alignment and int(alignment) % pixels:
        return [f"aspect_bucket_alignment={alignment} does not work with model_family={family}: image sides must "
                f"be multiples of {pixels} px ({why}); use {pixels} or 64"]
    return []


def prompt_length_problem(settings: Settings, family: str, minimum: int = 1) -> list[str]:
    length = settings.tokenizer_max_length
    if length is not None and int(length) < minimum:
        return [f"tokenizer_max_length={length} is too small for model_family={family}; use at least {minimum} "
                "or unset it for the model's default"]
    return []


def identity_digest(name: str, identity: list) -> str:
    digest = hashlib.sha256(json.dumps(identity, default=str).encode("utf-8")).hexdigest()
    return f"{name}-{digest[:16]}"


def encode_with_pipeline(family, prompts: list[str], **arguments):
    """What ``family``'s pipeline ``encode_prompt`` returns for ``prompts`` (no guidance), run on a text-only
    pipeline (``_pipeline_parts(None, text_only=True)``) on the text encoder's device."""
    encoder = family._loaded().text_encoders[0]
    text_only = family.pipeline_class(**family._pipeline_parts(None, text_only=True))
    with torch.no_grad():
        return text_only.encode_prompt(list(prompts), do_classifier_free_guidance=False, device=encoder.device,
                                       **arguments)


class PipelineTextEncoding:
    """Mixin: encode prompts with the family pipeline's own ``encode_prompt``.

    Each of these pipelines rewrites prompts before tokenizing (lower-casing,
    a prepended instruction or system prompt, token selection), so calling its
    method keeps the text cache identical to what inference feeds the model.
    """

    default_prompt_length: int
    # Fixed pipeline-call arguments for validation and inference renders.
    pipeline_call_extras: ClassVar[dict[str, Any]] = {}

    def prompt_length(self) -> int:
        """Text tokens per prompt: tokenizer_max_length, or the family's default."""
        return int(self.settings.tokenizer_max_length or self.default_prompt_length)

    def encode_prompt_arguments(self) -> dict[str, Any]:
        """Extra encode_prompt arguments; also passed to the pipeline at inference."""
        return {}

    def pipeline_call_arguments(self) -> dict[str, Any]:
        """Arguments a pipeline call needs to encode prompts the way training did."""
        return {"max_sequence_length": self.prompt_length(), **self.encode_prompt_arguments(),
                **self.pipeline_call_extras}

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompt_embeds (B, L, D) and prompt_attention_mask (B, L), L = the prompt length."""
        embeds, mask, _, _ = encode_with_pipeline(self, prompts, max_sequence_length=self.prompt_length(),
                                                  **self.encode_prompt_arguments())
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def _pipeline_parts(self, denoiser: torch.nn.Module | None, text_only: bool = False) -> dict[str, Any]:
        components = self._loaded()
        return {
            "tokenizer": components.tokenizers[0],
            "text_encoder": components.text_encoders[0],
            "vae": None if text_only else components.vae,
            "transformer": None if text_only else (denoiser if denoiser is not None else components.denoiser),
            "scheduler": None,  # build_pipeline sets the inference scheduler
        }


@register
class PixArtSigma(TransformerFamilyLoading, PipelineTextEncoding, UNetLatentFamily):
    """PixArt Sigma: a 0.6B (or 0.9B) DiT on SDXL-VAE latents, conditioned on T5-XXL (300 tokens, with its
    attention mask), epsilon prediction on the DDPM noise schedule (v_prediction can be chosen), trained
    around 1024px. The transformer also predicts a variance (learned sigma); training uses the noise half.
    diffusers' PixArtSigmaPipeline cannot load a PEFT LoRA, so with model_type=lora use lora_type=lycoris
    (LoKr with a learning rate near 1e-4 is a good start); the model is small enough that model_type=full is
    often the better choice. Keep validation_guidance low (3.5-4.5). pretrained_t5_model_name_or_path shares
    one T5 copy between base models."""

    name = "pixart_sigma"
    flavours = {
        "600M-1024px": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        "900M-1024-v0.6": "terminusresearch/pixart-900m-1024-ft-v0.6",
    }
    default_flavour = "600M-1024px"
    default_prediction_type = "epsilon"
    valid_prediction_types = ("epsilon", "v_prediction")
    denoiser_subfolder = "transformer"
    default_lora_targets = ATTENTION_LORA_TARGETS
    pipeline_class = LazyClass("diffusers", "PixArtSigmaPipeline")
    transformer_class = LazyClass("diffusers", "PixArtTransformer2DModel")
    img2img_pipeline_class = None
    text_encoder_attributes = ("text_encoder",)
    supports_text_encoder_training = False
    default_prompt_length = PIXART_PROMPT_LENGTH
    # Render at the size asked for, not the nearest entry of PixArt's aspect-ratio table.
    pipeline_call_extras = {"use_resolution_binning": False}

    # --- identity ---
    def fingerprint(self) -> str:
        s = self.settings
        return identity_digest(self.name, [self.name, self.model_path(s), s.revision, s.variant,
                                           s.pretrained_vae_model_name_or_path, s.pretrained_t5_model_name_or_path,
                                           self.prompt_length()])

    @classmethod
    def check_settings(cls, settings: Settings) -> list[str]:
        problems = super().check_settings(settings)
        # A ControlNet run merges its LoRA into the saved ControlNet, so no LoRA loader is needed there.
        if settings.model_type == "lora" and settings.lora_type == "standard" and not settings.controlnet:
            problems.append(
                "model_family=pixart_sigma cannot train a PEFT LoRA (lora_type=standard): diffusers' "
                "PixArtSigmaPipeline has no LoRA loader, so the result could not be used. Set lora_type=lycoris "
                "(with a lycoris_config file), or model_type=full"
            )
        if settings.train_text_encoder:
            problems.append("train_text_encoder is not supported for model_family=pixart_sigma (T5 stays frozen); "
                            "set train_text_encoder to false")
        problems += prompt_length_problem(settings, cls.name)
        problems += alignment_problem(settings, cls.name, 16, "8x VAE, 2x2 patches")
        return problems

    # --- loading ---
    def _load_text_encoders(self, path: str, weight_dtype: torch.dtype) -> tuple[list, list]:
        """T5 from the base model, or from pretrained_t5_model_name_or_path.

        That source may be laid out like the base model (text_encoder/ and
        tokenizer/ folders) or, as a local folder, be a plain T5 checkpoint.
        """
        tokenizer, encoder = self._load_replaceable_t5(path, weight_dtype)
        return [tokenizer], [encoder]

    # --- training ---
    def predict(self, batch: TrainingBatch, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The noise (or v) prediction; the learned-variance half of the output is dropped."""
        transformer = self._loaded().denoiser
        device, dtype = noisy_latents.device, noisy_latents.dtype
        output = transformer(
            noisy_latents,
            encoder_hidden_states=batch.text["prompt_embeds"].to(device=device, dtype=dtype),
            encoder_attention_mask=batch.text["prompt_attention_mask"].to(device),
            timestep=timesteps.to(device),
            added_cond_kwargs=dict(SIGMA_ADDED_CONDITIONS),
            return_dict=False,
            **self.control_kwargs(batch),
        )[0]
        if output.shape[1] == 2 * noisy_latents.shape[1]:
            output = output.chunk(2, dim=1)[0]
        return output

    # --- inference and saving ---
    def encode_prompt_arguments(self) -> dict[str, Any]:
        # Training captions are only lower-cased and stripped, never "cleaned" (that needs bs4 and ftfy).
        return {"clean_caption": False}

    def save_lora(self, output_dir: str, denoiser_lora_state: dict[str, torch.Tensor],
                  text_encoder_lora_states: dict[str, dict[str, torch.Tensor]] | None = None,
                  adapter_metadata: dict[str, dict] | None = None) -> None:
        raise ValueError("model_family=pixart_sigma cannot save a PEFT LoRA: PixArtSigmaPipeline has no LoRA "
                         "loader. Train with lora_type=lycoris or model_type=full.")
