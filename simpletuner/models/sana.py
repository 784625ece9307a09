"""Sana: a linear-attention DiT trained with flow matching on 32x deep-compression (DC-AE) latents.

Prompts are encoded by Gemma 2 through SanaPipeline.encode_prompt, so the
text cache holds exactly what inference feeds the model: the prompt is
lower-cased, prefixed with the "complex human instruction"
(sana_complex_human_instruction; unset = the instruction SanaPipeline uses
by default, an empty string = none), and Gemma's output is cut to the
first token plus the last ``tokenizer_max_length - 1`` tokens (default 300).

``GemmaFlowFamily`` holds what Sana and Lumina 2 share: a Gemma 2 text
encoder (optionally from pretrained_gemma_model_name_or_path), a flow-matching
transformer, and LoRA files written by the pipeline's save_lora_weights.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any, ClassVar

import torch

from simpletuner.config.settings import Settings
from simpletuner.data.types import TrainingBatch
from simpletuner.models.transformer_lora import save_transformer_lora
from simpletuner.models.base import Components
from simpletuner.models.pixart import (
    ATTENTION_LORA_TARGETS, PipelineTextEncoding, TransformerFamilyLoading, alignment_problem, identity_digest,
    prompt_length_problem,
)
from simpletuner.models.registry import register
from simpletuner.models.sd import LazyClass, UNetLatentFamily



def gemma_subfolders(source: str) -> tuple[str, str]:
    """(encoder, tokenizer) subfolders of a pretrained_gemma_model_name_or_path source.

    A local folder laid out like a diffusers pipeline (text_encoder/, tokenizer/)
    is read from those folders; any other source, such as a plain Gemma 2
    repository (google/gemma-2-2b-it) or its local copy, from its top level.
    """
    if os.path.isdir(os.path.join(source, "text_encoder")):
        return "text_encoder", "tokenizer"
    return "", ""


class GemmaFlowFamily(TransformerFamilyLoading, PipelineTextEncoding, UNetLatentFamily):
    """Flow-matching transformer families conditioned on Gemma 2 (Sana, Lumina 2). Not registered itself."""

    default_prediction_type = "flow_matching"
    flow_matching = True
    valid_prediction_types = ("flow_matching",)
    denoiser_subfolder = "transformer"
    gguf_options = ("pretrained_transformer_model_name_or_path",)
    default_lora_targets = ATTENTION_LORA_TARGETS
    text_encoder_attributes = ("text_encoder",)
    supports_text_encoder_training = False
    transformer_class: ClassVar[Any]
    patch_pixels: ClassVar[int]  # VAE downsampling x patch size: image sides must be multiples of this
    patch_pixels_reason: ClassVar[str]

    # --- identity ---
    def text_identity(self) -> list:
        """Settings that change the text embeddings (part of the cache fingerprint)."""
        return [self.settings.pretrained_gemma_model_name_or_path, self.prompt_length()]

    def fingerprint(self) -> str:
        s = self.settings
        return identity_digest(self.name, [self.name, self.model_path(s), s.revision, s.variant,
                                           s.pretrained_vae_model_name_or_path, *self.text_identity()])

    @classmethod
    def check_settings(cls, settings: Settings) -> list[str]:
        problems = super().check_settings(settings)
        if settings.train_text_encoder:
            problems.append(f"train_text_encoder is not supported for model_family={cls.name} (Gemma stays "
                            "frozen); set train_text_encoder to false")
        problems += prompt_length_problem(settings, cls.name, minimum=2)
        problems += alignment_problem(settings, cls.name, cls.patch_pixels, cls.patch_pixels_reason)
        return problems

    # --- loading ---
    def _load_text_encoders(self, path: str, weight_dtype: torch.dtype) -> tuple[list, list]:
        from transformers import AutoTokenizer, Gemma2Model

        custom = self.settings.pretrained_gemma_model_name_or_path
        quantization = self.quantization_load_kwargs("text_encoder", weight_dtype)
        if custom:
            encoder_folder, tokenizer_folder = gemma_subfolders(custom)
            tokenizer = AutoTokenizer.from_pretrained(custom, subfolder=tokenizer_folder)
            encoder = Gemma2Model.from_pretrained(custom, subfolder=encoder_folder, dtype=weight_dtype, **quantization)
            return [tokenizer], [encoder]
        revision = {"revision": self.settings.revision} if self.settings.revision else {}
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **revision)
        encoder = Gemma2Model.from_pretrained(path, subfolder="text_encoder", dtype=weight_dtype,
                                              **self._pretrained_kwargs(), **quantization)
        return [tokenizer], [encoder]

    def _training_scheduler(self, scheduler_config: dict):
        """Training only reads num_train_timesteps; sigmas come from the flow_* options."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(scheduler_config.get("num_train_timesteps",
                                                                                            1000)))

    def _inference_scheduler(self, scheduler_config: dict):
        """The scheduler the model ships, unchanged (its flow shift included)."""
        import diffusers

        scheduler_class = getattr(diffusers, scheduler_config.get("_class_name", ""), None)
        if scheduler_class is None:
            scheduler_class = diffusers.FlowMatchEulerDiscreteScheduler
        return scheduler_class.from_config(scheduler_config)

    # --- saving ---
    def save_lora(self, output_dir: str, denoiser_lora_state: dict[str, torch.Tensor],
                  text_encoder_lora_states: dict[str, dict[str, torch.Tensor]] | None = None,
                  adapter_metadata: dict[str, dict] | None = None) -> None:
        """Write pytorch_lora_weights.safetensors with the pipeline's save_lora_weights.

        Written in a temporary folder inside ``output_dir`` and renamed into
        place, so a crash never leaves a partial file.
        """
        save_transformer_lora(self, output_dir, denoiser_lora_state, text_encoder_lora_states, adapter_metadata)


def default_complex_human_instruction() -> list[str]:
    """The instruction SanaPipeline prepends when called without one.

    Read from the pipeline's signature rather than copied, so training and
    diffusers inference always agree.
    """
    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


def instruction_lines(value: Any) -> list[str] | None:
    """sana_complex_human_instruction as lines: None (unset) -> None, "" -> [], a JSON list -> its items."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [str(line) for line in value]
    text = str(value)
    if text.lstrip().startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list):
            return [str(line) for line in parsed]
    return [text] if text else []


@register
class Sana(GemmaFlowFamily):
    """Sana (NVIDIA): 0.6B or 1.6B linear-attention DiT on 32x DC-AE latents, Gemma 2 text encoder, flow
    matching. Every caption is encoded after the complex human instruction (sana_complex_human_instruction,
    default: the one SanaPipeline uses), so short prompts behave like Sana's own. The first Sana weights
    needed fp16; train the BF16 checkpoints with mixed_precision=bf16. Sana's loss runs high and it wants low
    learning rates: around 1e-5 for full fine-tunes, 1e-4 for LyCORIS LoKr with AdamW. PEFT LoRA is saved in
    the diffusers format that SanaPipeline.load_lora_weights reads. Image sides must be multiples of 32 px."""

    name = "sana"
    vae_class_name = "AutoencoderDC"  # the 32x deep-compression autoencoder
    latent_patch_size = 1  # one token per latent pixel
    flavours = {
        "sana1.0-1.6b-1024": "terminusresearch/sana-1.6b-1024px",
        "sana1.0-1.6b-1024-bf16": "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers",
        "sana1.0-1.6b-512": "Efficient-Large-Model/Sana_1600M_512px_diffusers",
        "sana1.0-1.6b-2048": "Efficient-Large-Model/Sana_1600M_2Kpx_BF16_diffusers",
        "sana1.0-1.6b-4096": "Efficient-Large-Model/Sana_1600M_4Kpx_BF16_diffusers",
        "sana1.0-600m-1024": "Efficient-Large-Model/Sana_600M_1024px_diffusers",
        "sana1.0-600m-512": "Efficient-Large-Model/Sana_600M_512px_diffusers",
    }
    default_flavour = "sana1.0-1.6b-1024"
    pipeline_class = LazyClass("diffusers", "SanaPipeline")
    transformer_class = LazyClass("diffusers", "SanaTransformer2DModel")
    default_prompt_length = 300
    patch_pixels = 32
    patch_pixels_reason = "32x DC-AE, 1x1 patches"
    # Render at the size asked for, not the nearest entry of Sana's aspect-ratio table.
    pipeline_call_extras = {"use_resolution_binning": False}

    def complex_human_instruction(self) -> list[str]:
        lines = instruction_lines(self.settings.sana_complex_human_instruction)
        return default_complex_human_instruction() if lines is None else lines

    def text_identity(self) -> list:
        return [*super().text_identity(), self.complex_human_instruction()]

    def encode_prompt_arguments(self) -> dict[str, Any]:
        return {"complex_human_instruction": self.complex_human_instruction(), "clean_caption": False}

    # --- loading ---
    def _finish_load(self, components: Components, path: str, device: torch.device,
                     scheduler_config: dict | None = None) -> None:
        super()._finish_load(components, path, device, scheduler_config)
        # SanaPipeline multiplies timesteps by this before calling the transformer; so does predict.
        components.extras["timestep_scale"] = float(getattr(components.denoiser.config, "timestep_scale", 1.0))

    # --- encoders ---
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """DC-AE latents times the scaling factor (the DC-AE is deterministic: no posterior to sample)."""
        vae = self._loaded().vae
        with torch.no_grad():
            latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent
        return latents * vae.config.scaling_factor

    # --- training ---
    def predict(self, batch: TrainingBatch, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The flow velocity (noise - latents); timesteps are sigma * num_train_timesteps, as SanaPipeline uses."""
        components = self._loaded()
        device, dtype = noisy_latents.device, noisy_latents.dtype
        scaled = timesteps.to(device=device, dtype=torch.float32) * components.extras.get("timestep_scale", 1.0)
        return components.denoiser(
            noisy_latents,
            encoder_hidden_states=batch.text["prompt_embeds"].to(device=device, dtype=dtype),
            encoder_attention_mask=batch.text["prompt_attention_mask"].to(device),
            timestep=scaled.expand(noisy_latents.shape[0]),
            return_dict=False,
            **self.control_kwargs(batch),
        )[0]
