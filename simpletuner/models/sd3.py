"""Stable Diffusion 3 / 3.5: an MMDiT trained with flow matching on 16-channel VAE latents.

Text comes from three encoders, encoded the way diffusers' StableDiffusion3Pipeline
does it: the penultimate hidden states of CLIP-L and CLIP-G are concatenated,
zero-padded to T5's width and followed by T5's sequence; the two CLIP pooled
outputs are concatenated into ``pooled_prompt_embeds``.

Options that change the embeddings (and so the cache fingerprint):
- tokenizer_max_length: T5's token count (default 154); CLIP always reads 77.
- t5_padding=zero: zero T5's padded positions (default: keep them as encoded).
- sd3_clip_uncond_behaviour / sd3_t5_uncond_behaviour: for an empty caption
  (caption dropout), encode "" as usual (empty_string) or use all-zero
  embeddings (zero). The T5 choice follows the CLIP one unless set.

The base model may also be a single original-layout ``.safetensors`` file;
its architecture (and any part the file lacks, such as the text encoders)
comes from the diffusers folder of the chosen flavour.

``FlowTransformerFamily`` holds what latent flow-matching transformer
families share (transformer loading, flow scheduler, LoRA saving); AuraFlow
builds on it too.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, ClassVar

import torch

from simpletuner.config.settings import Settings
from simpletuner.data.types import TrainingBatch
from simpletuner.models.transformer_lora import save_transformer_lora
from simpletuner.models.base import Components
from simpletuner.models.registry import register
from simpletuner.models.load_quantization import gguf_load_kwargs, is_gguf_file
from simpletuner.models.locations import local_subfolder
from simpletuner.models.sd import LazyClass, UNetLatentFamily
from simpletuner.models.sdxl import is_single_file

ATTENTION_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
T5_LENGTH_LIMIT = 512  # the longest T5 input the diffusers pipelines accept
# The VAE downsamples 8x and the transformers cut latents into 2x2 patches.
PIXELS_PER_PATCH = 16
UNCOND_ZERO = "zero"
# A key each text encoder has inside an original-layout SD3 single-file checkpoint.
SINGLE_FILE_TEXT_ENCODER_KEYS = {
    "text_encoder": "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight",
    "text_encoder_2": "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight",
    "text_encoder_3": "text_encoders.t5xxl.transformer.shared.weight",
}


class FlowTransformerFamily(UNetLatentFamily):
    """Latent flow-matching transformer families (SD3, AuraFlow). Not registered itself.

    Reuses UNetLatentFamily's VAE handling (encode/decode with shift and
    scaling), pipeline building and revision/variant plumbing; replaces the
    denoiser loading, schedulers and LoRA saving.
    """

    default_prediction_type = "flow_matching"
    flow_matching = True
    denoiser_subfolder = "transformer"
    default_lora_targets = ATTENTION_LORA_TARGETS
    supports_text_encoder_training = False
    valid_prediction_types = ("flow_matching",)
    gguf_options = ("pretrained_transformer_model_name_or_path",)
    transformer_class: ClassVar[Any]
    default_t5_length: ClassVar[int]
    t5_reads_attention_mask: ClassVar[bool] = True
    # Options whose value changes the text embeddings, so they are part of the cache fingerprint.
    text_options: ClassVar[tuple[str, ...]] = ("tokenizer_max_length", "t5_padding", "pretrained_t5_model_name_or_path")

    # --- identity ---
    def fingerprint(self) -> str:
        s = self.settings
        identity = [self.name, self.model_path(s), s.revision, s.variant, s.pretrained_vae_model_name_or_path,
                    self.t5_length(), *[getattr(s, name) for name in self.text_options]]
        if is_single_file(self.model_path(s)):
            identity.append(self.single_file_config())
        digest = hashlib.sha256(json.dumps(identity, default=str).encode("utf-8")).hexdigest()
        return f"{self.name}-{digest[:16]}"

    @classmethod
    def t5_length_limit(cls, settings: Settings) -> int:
        return T5_LENGTH_LIMIT

    def t5_length(self) -> int:
        """How many tokens T5 reads: tokenizer_max_length, or the family's default for the flavour."""
        return int(self.settings.tokenizer_max_length or self.default_t5_length)

    @classmethod
    def check_settings(cls, settings: Settings) -> list[str]:
        problems = super().check_settings(settings)
        if settings.train_text_encoder:
            problems.append(f"train_text_encoder is not supported for model_family={cls.name}; "
                            "set train_text_encoder to false (the text encoders stay frozen)")
        length = settings.tokenizer_max_length
        limit = cls.t5_length_limit(settings)
        if length is not None and not 1 <= int(length) <= limit and not settings.i_know_what_i_am_doing:
            problems.append(f"tokenizer_max_length={length} is outside 1..{limit} for model_family={cls.name}; "
                            f"use at most {limit} T5 tokens, or unset it for the model's default")
        alignment = settings.aspect_bucket_alignment
        if alignment and int(alignment) % PIXELS_PER_PATCH:
            problems.append(f"aspect_bucket_alignment={alignment} does not work with model_family={cls.name}: image "
                            f"sides must be multiples of {PIXELS_PER_PATCH} px (8x VAE, 2x2 patches); use 16, 32 or 64")
        return problems

    # --- loading ---
    def load(self, device: torch.device, weight_dtype: torch.dtype) -> Components:
        path = self.model_path(self.settings)
        if is_single_file(path):
            raise ValueError(f"pretrained_model_name_or_path={path!r} is a single file, which model_family="
                             f"{self.name} cannot load; give a diffusers folder or hub id")
        tokenizers, text_encoders = self._load_text_encoders(path, weight_dtype)
        components = Components(
            denoiser=self._load_transformer(path, weight_dtype),
            vae=self._load_vae(path),
            text_encoders=text_encoders,
            tokenizers=tokenizers,
        )
        self._finish_load(components, path, device)
        return components

    def _load_transformer(self, path: str, weight_dtype: torch.dtype):
        subfolder = self.settings.pretrained_transformer_subfolder or "transformer"
        subfolder = None if subfolder == "none" else subfolder
        custom = self.settings.pretrained_transformer_model_name_or_path
        if is_gguf_file(custom):  # quantised already; its architecture comes from the base model's folder
            return self.transformer_class.from_single_file(custom, config=path, subfolder="transformer",
                                                           **gguf_load_kwargs(weight_dtype))
        quantization = self.quantization_load_kwargs("transformer", weight_dtype)
        if custom:
            return self.transformer_class.from_pretrained(
                custom, subfolder=local_subfolder(custom, subfolder), torch_dtype=weight_dtype, **quantization
            )
        return self.transformer_class.from_pretrained(
            path, subfolder=subfolder, torch_dtype=weight_dtype, **self._pretrained_kwargs(), **quantization
        )

    def _load_clip_pair(self, path: str, weight_dtype: torch.dtype) -> tuple[list, list]:
        """CLIP-L and CLIP-G with projection (text_encoder/, text_encoder_2/) and their tokenizers."""
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        clip_l, clip_g = (self._load_encoder_pair(path, CLIPTokenizer, CLIPTextModelWithProjection, weight_dtype,
                                                  encoder_subfolder=f"text_encoder{suffix}",
                                                  tokenizer_subfolder=f"tokenizer{suffix}")
                          for suffix in ("", "_2"))
        return [clip_l[0], clip_g[0]], [clip_l[1], clip_g[1]]

    def _load_t5(self, path: str, encoder_class, tokenizer_class, encoder_subfolder: str,
                 tokenizer_subfolder: str, weight_dtype: torch.dtype) -> tuple[Any, Any]:
        """(tokenizer, encoder) from the base model, or from pretrained_t5_model_name_or_path.

        That source is either a folder or repository laid out like the base model
        (T5 in ``encoder_subfolder``) or, for a local folder, a plain T5 model whose
        config.json and tokenizer files sit at its top level.
        """
        custom = self.settings.pretrained_t5_model_name_or_path
        quantization = self.quantization_load_kwargs(encoder_subfolder, weight_dtype)
        if custom:
            # transformers spells "no subfolder" as ""
            tokenizer = tokenizer_class.from_pretrained(
                custom, subfolder=local_subfolder(custom, tokenizer_subfolder) or "")
            encoder = encoder_class.from_pretrained(
                custom, subfolder=local_subfolder(custom, encoder_subfolder) or "", dtype=weight_dtype, **quantization)
            return tokenizer, encoder
        revision = {"revision": self.settings.revision} if self.settings.revision else {}
        tokenizer = tokenizer_class.from_pretrained(path, subfolder=tokenizer_subfolder, **revision)
        encoder = encoder_class.from_pretrained(path, subfolder=encoder_subfolder, dtype=weight_dtype,
                                                **self._pretrained_kwargs(), **quantization)
        return tokenizer, encoder

    def _training_scheduler(self, scheduler_config: dict):
        """The model's flow-matching scheduler; training only reads its num_train_timesteps."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def _inference_scheduler(self, scheduler_config: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    # --- encoders ---
    def _encode_t5(self, tokenizer, encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden states, attention mask) for prompts padded/truncated to ``t5_length()`` tokens.

        The mask reaches the encoder only where the family's pipeline passes it
        (``t5_reads_attention_mask``), so cached embeddings match inference.
        """
        tokens = tokenizer(prompts, padding="max_length", max_length=self.t5_length(), truncation=True,
                           add_special_tokens=True, return_tensors="pt")
        ids = tokens.input_ids.to(encoder.device)
        mask = tokens.attention_mask.to(encoder.device)
        with torch.no_grad():
            hidden = encoder(ids, attention_mask=mask if self.t5_reads_attention_mask else None)[0]
        return hidden, mask

    @staticmethod
    def _flow_timesteps(timesteps: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """One float32 timestep per sample (float32 keeps the sinusoidal embedding precise under bf16)."""
        return timesteps.to(device=latents.device, dtype=torch.float32).expand(latents.shape[0])

    # --- inference ---
    def pipeline_call_arguments(self) -> dict[str, Any]:
        """Arguments a pipeline call needs to encode prompts the way training did."""
        return {"max_sequence_length": self.t5_length()}

    # --- saving ---
    def save_lora(self, output_dir: str, denoiser_lora_state: dict[str, torch.Tensor],
                  text_encoder_lora_states: dict[str, dict[str, torch.Tensor]] | None = None,
                  adapter_metadata: dict[str, dict] | None = None) -> None:
        """Write pytorch_lora_weights.safetensors (PEFT key names, the layout diffusers' loaders read).

        The file is written in a temporary folder inside ``output_dir`` and
        renamed into place, so a crash never leaves a partial file.
        """
        save_transformer_lora(self, output_dir, denoiser_lora_state, text_encoder_lora_states, adapter_metadata)


@register
class StableDiffusion3(FlowTransformerFamily):
    name = "sd3"
    flavours = {
        "medium": "stabilityai/stable-diffusion-3.5-medium",
        "large": "stabilityai/stable-diffusion-3.5-large",
        "3.0-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    }
    default_flavour = "medium"
    default_t5_length = 154
    t5_reads_attention_mask = False  # StableDiffusion3Pipeline runs T5 without a mask
    transformer_class = LazyClass("diffusers", "SD3Transformer2DModel")
    pipeline_class = LazyClass("diffusers", "StableDiffusion3Pipeline")
    img2img_pipeline_class = LazyClass("diffusers", "StableDiffusion3Img2ImgPipeline")
    text_encoder_attributes = ("text_encoder", "text_encoder_2", "text_encoder_3")
    text_options = FlowTransformerFamily.text_options + ("sd3_clip_uncond_behaviour", "sd3_t5_uncond_behaviour")

    # --- loading ---
    def load(self, device: torch.device, weight_dtype: torch.dtype) -> Components:
        path = self.model_path(self.settings)
        if not is_single_file(path):
            return super().load(device, weight_dtype)
        if not path.lower().endswith(".safetensors"):
            raise ValueError(f"pretrained_model_name_or_path={path!r}: SD3 single-file checkpoints must be "
                             ".safetensors files; convert it, or give a diffusers folder or hub id")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"pretrained_model_name_or_path={path!r} looks like a single-file checkpoint but does not exist"
            )
        return self._load_single_file(path, device, weight_dtype)

    def _load_single_file(self, path: str, device: torch.device, weight_dtype: torch.dtype) -> Components:
        config, preloaded = self._single_file_parts(path, weight_dtype, self._load_transformer)
        preloaded.update(self._text_encoders_missing_from(path, config, weight_dtype))
        pipeline = self.pipeline_class.from_single_file(path, config=config, torch_dtype=weight_dtype, **preloaded)
        components = Components(
            denoiser=pipeline.transformer,
            vae=pipeline.vae,
            text_encoders=[pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3],
            tokenizers=[pipeline.tokenizer, pipeline.tokenizer_2, pipeline.tokenizer_3],
        )
        self._finish_load(components, config, device, scheduler_config=dict(pipeline.scheduler.config))
        return components

    def _text_encoders_missing_from(self, path: str, config: str, weight_dtype: torch.dtype) -> dict[str, Any]:
        """Text encoders (and their tokenizers) the checkpoint lacks, loaded from the flavour's folder.

        SD 3.5 files usually hold only the transformer and VAE; some SD3 files
        also carry the encoders. pretrained_t5_model_name_or_path always wins for T5.
        """
        from safetensors import safe_open
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        with safe_open(path, framework="pt") as handle:
            keys = set(handle.keys())
        revision = {"revision": self.settings.revision} if self.settings.revision else {}
        loaded: dict[str, Any] = {}
        for attribute in ("text_encoder", "text_encoder_2"):
            if SINGLE_FILE_TEXT_ENCODER_KEYS[attribute] not in keys:
                tokenizer = attribute.replace("text_encoder", "tokenizer")
                loaded[tokenizer] = CLIPTokenizer.from_pretrained(config, subfolder=tokenizer, **revision)
                loaded[attribute] = CLIPTextModelWithProjection.from_pretrained(
                    config, subfolder=attribute, dtype=weight_dtype, **self._pretrained_kwargs(),
                    **self.quantization_load_kwargs(attribute, weight_dtype))
        t5_in_file = SINGLE_FILE_TEXT_ENCODER_KEYS["text_encoder_3"] in keys
        if self.settings.pretrained_t5_model_name_or_path or not t5_in_file:
            loaded["tokenizer_3"], loaded["text_encoder_3"] = self._load_sd3_t5(config, weight_dtype)
        return loaded

    def _load_sd3_t5(self, path: str, weight_dtype: torch.dtype) -> tuple[Any, Any]:
        from transformers import T5EncoderModel, T5TokenizerFast

        return self._load_t5(path, T5EncoderModel, T5TokenizerFast, "text_encoder_3", "tokenizer_3", weight_dtype)

    def _load_text_encoders(self, path: str, weight_dtype: torch.dtype) -> tuple[list, list]:
        tokenizers, encoders = self._load_clip_pair(path, weight_dtype)
        t5_tokenizer, t5_encoder = self._load_sd3_t5(path, weight_dtype)
        return tokenizers + [t5_tokenizer], encoders + [t5_encoder]

    # --- encoders ---
    def uncond_behaviours(self) -> tuple[str, str]:
        """(CLIP, T5) handling of empty captions; T5's follows CLIP's unless set."""
        clip = self.settings.sd3_clip_uncond_behaviour or "empty_string"
        return clip, self.settings.sd3_t5_uncond_behaviour or clip

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``prompt_embeds`` (B, 77 + T5 length, T5 width) and ``pooled_prompt_embeds`` (B, CLIP-L + CLIP-G)."""
        components = self._loaded()
        prompts = list(prompts)
        clip_states, pooled = [], []
        with torch.no_grad():
            for tokenizer, encoder in zip(components.tokenizers[:2], components.text_encoders[:2]):
                output = encoder(self._tokenize(tokenizer, prompts, encoder.device), output_hidden_states=True)
                clip_states.append(output.hidden_states[-2])
                pooled.append(output[0])  # the projected pooled embedding
        t5, mask = self._encode_t5(components.tokenizers[2], components.text_encoders[2], prompts)
        clip = torch.cat(clip_states, dim=-1)
        t5 = t5.to(clip.dtype)
        if self.settings.t5_padding == "zero":
            t5 = t5 * mask.unsqueeze(-1).to(t5.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        pooled_embeds = torch.cat(pooled, dim=-1)
        empty = torch.tensor([not prompt.strip() for prompt in prompts], device=clip.device)
        clip_behaviour, t5_behaviour = self.uncond_behaviours()
        if clip_behaviour == UNCOND_ZERO:
            clip[empty] = 0
            pooled_embeds[empty] = 0
        if t5_behaviour == UNCOND_ZERO:
            t5[empty] = 0
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled_prompt_embeds": pooled_embeds}

    # --- training ---
    def predict(self, batch: TrainingBatch, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """SD3's transformer takes the flow timestep on the 0..num_train_timesteps scale, as the trainer passes it."""
        transformer = self._loaded().denoiser
        device, dtype = noisy_latents.device, noisy_latents.dtype
        return transformer(
            hidden_states=noisy_latents,
            encoder_hidden_states=batch.text["prompt_embeds"].to(device=device, dtype=dtype),
            pooled_projections=batch.text["pooled_prompt_embeds"].to(device=device, dtype=dtype),
            timestep=self._flow_timesteps(timesteps, noisy_latents),
            return_dict=False,
            **self.control_kwargs(batch),
        )[0]

    # --- inference ---
    def _pipeline_parts(self, denoiser: torch.nn.Module | None) -> dict[str, Any]:
        components = self._loaded()
        parts: dict[str, Any] = {"vae": components.vae,
                                 "transformer": denoiser if denoiser is not None else components.denoiser}
        for index, attribute in enumerate(self.text_encoder_attributes):
            parts[attribute] = components.text_encoders[index]
            parts[attribute.replace("text_encoder", "tokenizer")] = components.tokenizers[index]
        return parts
