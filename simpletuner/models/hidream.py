"""HiDream-I1: a 17B mixture-of-experts flow-matching DiT on 16-channel Flux-VAE latents, four text encoders.

Prompts are encoded the way diffusers' HiDreamImagePipeline encodes them, every
encoder reading up to ``tokenizer_max_length`` tokens (default 128; CLIP at most 218):

- CLIP-L and CLIP-G (with projection): their projected pooled outputs, concatenated,
  are ``pooled_prompt_embeds``;
- T5 (with its attention mask): the last hidden states, ``t5_prompt_embeds``;
- Llama 3.1 8B Instruct (with its attention mask, padded with its end token): the
  hidden states after every decoder layer, ``llama_prompt_embeds`` stored batch-first
  as (B, layers, tokens, width); the transformer feeds one layer to each block
  (its ``llama_layers``).

The HiDream-ai repositories do not ship Llama; when the base model has no
``text_encoder_4`` it is read from ``LLAMA_SOURCE``, as HiDream's own example does.

The transformer takes the trainer's timestep (sigma * 1000) unchanged and predicts
latents - noise, so ``predict`` negates it to give the velocity (noise - latents).
In training mode it returns its output still cut into patches, which ``predict``
reassembles. hidream_use_load_balancing_loss adds the experts' balance term
(hidream_moe.py) to the loss through ``auxiliary_loss``.
"""

from __future__ import annotations

from typing import Any

import torch

from simpletuner.config.settings import Settings
from simpletuner.data.types import TrainingBatch
from simpletuner.models.hidream_moe import RouterBalance, dequantize_router_weights
from simpletuner.models.load_quantization import is_gguf_file
from simpletuner.models.registry import register
from simpletuner.models.sd import LazyClass
from simpletuner.models.sd3 import FlowTransformerFamily

LLAMA_SOURCE = "unsloth/Meta-Llama-3.1-8B-Instruct"  # an ungated copy of meta-llama/Llama-3.1-8B-Instruct
HIDREAM_PROMPT_LENGTH = 128
CLIP_LENGTH_LIMIT = 218  # HiDreamImagePipeline never gives its CLIP encoders more tokens than this
HIDREAM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t")


def unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(module, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return module
        module = inner


def latents_from_patches(patches: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """HiDream's training-mode output (B, C, tokens, patch * patch) -> (B, C, height, width).

    Tokens run row by row over the (height / patch) x (width / patch) grid; a
    non-square grid's output carries padding tokens after them, which are dropped.
    """
    batch, channels = patches.shape[:2]
    rows, columns = height // patch, width // patch
    grid = patches[:, :, : rows * columns].reshape(batch, channels, rows, columns, patch, patch)
    return grid.permute(0, 1, 2, 4, 3, 5).reshape(batch, channels, height, width)


@register
class HiDream(FlowTransformerFamily):
    """HiDream-I1 (HiDream.ai): a 17B mixture-of-experts DiT (about 8B active per token) on Flux-VAE latents,
    conditioned on CLIP-L, CLIP-G, T5-XXL and Llama 3.1 8B Instruct, flow matching. Train the undistilled
    `full` flavour; `dev` and `fast` are distilled. A 24G GPU is about the minimum: quantise the base model and
    the T5/Llama encoders (base_model_precision, text_encoder_3_precision, text_encoder_4_precision =
    int8-quanto), enable gradient_checkpointing and use mixed_precision bf16. LyCORIS LoKr on the attention
    layers (learning rate 1e-4 with AdamW, 2e-5 with Lion) or PEFT LoRA (4e-4 for small ranks, 6e-5 for large)
    both work; LoRA files load with HiDreamImagePipeline.load_lora_weights. Prompts are cut at 128 tokens
    (tokenizer_max_length). hidream_use_load_balancing_loss adds the experts' router balance term to the loss
    (weight hidream_load_balancing_loss_weight). Llama comes from the base model's text_encoder_4 when it has
    one, else from unsloth/Meta-Llama-3.1-8B-Instruct (the HiDream-ai repositories ship none, so diffusers needs
    tokenizer_4= and text_encoder_4= passed to from_pretrained for them). Image sides must be multiples of 16 px;
    non-square images may hold at most the transformer's maximum area (1024x1024 px). HiDreamImagePipeline renders
    every validation_resolution at that area, keeping only its aspect ratio."""

    name = "hidream"
    diffusers_loads_comfyui_lora = False  # its loader rejects the ".alpha" keys; ComfyUI itself reads them
    flavours = {
        "full": "HiDream-ai/HiDream-I1-Full",
        "dev": "HiDream-ai/HiDream-I1-Dev",
        "fast": "HiDream-ai/HiDream-I1-Fast",
    }
    default_flavour = "full"
    default_t5_length = HIDREAM_PROMPT_LENGTH
    default_lora_targets = HIDREAM_LORA_TARGETS
    transformer_class = LazyClass("diffusers", "HiDreamImageTransformer2DModel")
    pipeline_class = LazyClass("diffusers", "HiDreamImagePipeline")
    img2img_pipeline_class = None  # diffusers has no HiDream img2img pipeline
    text_encoder_attributes = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.router_balance = RouterBalance()

    @classmethod
    def check_settings(cls, settings: Settings) -> list[str]:
        problems = super().check_settings(settings)
        weight = settings.hidream_load_balancing_loss_weight
        if weight is not None and float(weight) < 0:
            problems.append(f"hidream_load_balancing_loss_weight={weight} must not be negative (a negative weight "
                            "would reward an unbalanced router); use 0.01, or up to 0.1-0.2 for a stronger push")
        return problems

    # --- loading ---
    def _load_text_encoders(self, path: str, weight_dtype: torch.dtype) -> tuple[list, list]:
        from transformers import T5EncoderModel, T5Tokenizer

        tokenizers, encoders = self._load_clip_pair(path, weight_dtype)
        t5_tokenizer, t5 = self._load_t5(path, T5EncoderModel, T5Tokenizer, "text_encoder_3", "tokenizer_3",
                                         weight_dtype)
        llama_tokenizer, llama = self._load_llama(path, weight_dtype)
        return tokenizers + [t5_tokenizer, llama_tokenizer], encoders + [t5, llama]

    def _load_transformer(self, path: str, weight_dtype: torch.dtype):
        transformer = super()._load_transformer(path, weight_dtype)
        if is_gguf_file(self.settings.pretrained_transformer_model_name_or_path):
            dequantize_router_weights(transformer, weight_dtype)
        return transformer

    def llama_location(self, path: str) -> tuple[str, str, str]:
        """(source, encoder subfolder, tokenizer subfolder) of Llama: the base model's text_encoder_4 when its
        model_index.json names one, else LLAMA_SOURCE's top level."""
        from diffusers import DiffusionPipeline

        revision = {"revision": self.settings.revision} if self.settings.revision else {}
        index = DiffusionPipeline.load_config(path, **revision)
        if (index.get("text_encoder_4") or [None])[0] and (index.get("tokenizer_4") or [None])[0]:
            return path, "text_encoder_4", "tokenizer_4"
        return LLAMA_SOURCE, "", ""

    def _load_llama(self, path: str, weight_dtype: torch.dtype) -> tuple[Any, Any]:
        from transformers import AutoTokenizer, LlamaForCausalLM

        source, encoder_folder, tokenizer_folder = self.llama_location(path)
        from_base = source == path
        revision = {"revision": self.settings.revision} if from_base and self.settings.revision else {}
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder=tokenizer_folder, **revision)
        tokenizer.pad_token = tokenizer.eos_token  # HiDreamImagePipeline pads Llama's input with its end token
        encoder = LlamaForCausalLM.from_pretrained(
            source, subfolder=encoder_folder, dtype=weight_dtype, **(self._pretrained_kwargs() if from_base else {}),
            **self.quantization_load_kwargs("text_encoder_4", weight_dtype))
        return tokenizer, encoder

    def _training_scheduler(self, scheduler_config: dict):
        """Training reads only num_train_timesteps; the sigmas come from the flow_* options."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        steps = int(scheduler_config.get("num_train_timesteps", 1000))
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=steps)

    def _inference_scheduler(self, scheduler_config: dict):
        """The scheduler the flavour ships (flow UniPC, Euler or LCM), unchanged."""
        import diffusers

        scheduler_class = getattr(diffusers, scheduler_config.get("_class_name", ""), None)
        return (scheduler_class or diffusers.FlowMatchEulerDiscreteScheduler).from_config(scheduler_config)

    # --- encoders ---
    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``pooled_prompt_embeds`` (B, CLIP-L + CLIP-G), ``t5_prompt_embeds`` (B, L, T5 width) and
        ``llama_prompt_embeds`` (B, Llama layers, L, Llama width), L = tokenizer_max_length (default 128)."""
        components = self._loaded()
        prompts = list(prompts)
        tokenizers, encoders = components.tokenizers, components.text_encoders
        with torch.no_grad():
            pooled = torch.cat([self._clip_pooled(tokenizers[slot], encoders[slot], prompts) for slot in (0, 1)],
                               dim=-1)
            t5 = self._t5_states(tokenizers[2], encoders[2], prompts)
            llama = self._llama_states(tokenizers[3], encoders[3], prompts)
        return {"pooled_prompt_embeds": pooled, "t5_prompt_embeds": t5, "llama_prompt_embeds": llama}

    def _tokens(self, tokenizer, prompts: list[str], limit: int, device: torch.device):
        length = min(self.t5_length(), limit)
        tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                           add_special_tokens=True, return_tensors="pt")
        return tokens.input_ids.to(device), tokens.attention_mask.to(device)

    def _clip_pooled(self, tokenizer, encoder, prompts: list[str]) -> torch.Tensor:
        ids, _ = self._tokens(tokenizer, prompts, CLIP_LENGTH_LIMIT, encoder.device)
        return encoder(ids)[0]  # the projected pooled embedding; HiDream's CLIPs read no attention mask

    def _t5_states(self, tokenizer, encoder, prompts: list[str]) -> torch.Tensor:
        ids, mask = self._tokens(tokenizer, prompts, tokenizer.model_max_length, encoder.device)
        states = encoder(ids, attention_mask=mask)[0]
        if self.settings.t5_padding == "zero":
            states = states * mask.unsqueeze(-1).to(states.dtype)
        return states

    def _llama_states(self, tokenizer, encoder, prompts: list[str]) -> torch.Tensor:
        """Every decoder layer's output, batch first. Only hidden states count, so the causal LM's head
        scores one position rather than all (logits_to_keep=1)."""
        ids, mask = self._tokens(tokenizer, prompts, tokenizer.model_max_length, encoder.device)
        hidden = encoder(ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1).hidden_states
        return torch.stack(hidden[1:], dim=1)  # hidden[0] is the token embedding, not a layer's output

    # --- training ---
    def predict(self, batch: TrainingBatch, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The flow velocity (noise - latents) for timesteps = sigma * num_train_timesteps."""
        denoiser = self._loaded().denoiser
        transformer = unwrapped(denoiser)
        height, width = noisy_latents.shape[-2:]
        self._check_grid(transformer.config, height, width)
        device, dtype = noisy_latents.device, noisy_latents.dtype
        text = batch.text
        arguments = dict(
            hidden_states=noisy_latents,
            timesteps=self._flow_timesteps(timesteps, noisy_latents),
            encoder_hidden_states_t5=text["t5_prompt_embeds"].to(device=device, dtype=dtype),
            encoder_hidden_states_llama3=text["llama_prompt_embeds"].to(device=device, dtype=dtype).transpose(0, 1),
            pooled_embeds=text["pooled_prompt_embeds"].to(device=device, dtype=dtype),
            return_dict=False,
        )
        if self.settings.hidream_use_load_balancing_loss:
            with self.router_balance.recording(denoiser):
                output = denoiser(**arguments)[0]
        else:
            output = denoiser(**arguments)[0]
        if transformer.training and not transformer.config.force_inference_output:
            output = latents_from_patches(output, height, width, transformer.config.patch_size)
        return -output

    @staticmethod
    def _check_grid(config, height: int, width: int) -> None:
        patch = config.patch_size
        if height % patch or width % patch:
            raise ValueError(f"HiDream cuts latents into {patch}x{patch} patches, but a batch has a {height}x{width} "
                             "latent grid; use bucket sizes that are multiples of 16 pixels")
        rows, columns = config.max_resolution
        if height != width and (height // patch) * (width // patch) > rows * columns // (patch * patch):
            raise ValueError(f"HiDream pads non-square latents to its maximum area ({rows}x{columns} latents), but "
                             f"a batch has {height}x{width}; train non-square images at a smaller resolution "
                             "(at most the area of 1024x1024 px for the released models)")

    def auxiliary_loss(self) -> torch.Tensor | None:
        """hidream_load_balancing_loss_weight times the router balance terms of the latest ``predict``."""
        terms = self.router_balance.take()
        if terms is None:
            return None
        return float(self.settings.hidream_load_balancing_loss_weight) * terms

    # --- inference ---
    def _pipeline_parts(self, denoiser: torch.nn.Module | None) -> dict[str, Any]:
        components = self._loaded()
        parts: dict[str, Any] = {"vae": components.vae,
                                 "transformer": denoiser if denoiser is not None else components.denoiser}
        for slot, attribute in enumerate(self.text_encoder_attributes):
            parts[attribute] = components.text_encoders[slot]
            parts[attribute.replace("text_encoder", "tokenizer")] = components.tokenizers[slot]
        return parts

    def build_pipeline(self, denoiser: torch.nn.Module | None = None, *, img2img: bool = False, **overrides):
        """A HiDreamImagePipeline that renders at the area of its transformer's ``max_resolution``.

        The pipeline scales every requested size to one area, fixed at 128x128 latents (1024 px, the
        released models' max_resolution); reading it from the transformer keeps other sizes right.
        """
        if img2img:
            raise ValueError("model_family=hidream has no img2img pipeline in diffusers; build the text-to-image one")
        pipeline = super().build_pipeline(denoiser, **overrides)
        pipeline.default_sample_size = int(unwrapped(pipeline.transformer).config.max_resolution[0])
        return pipeline
