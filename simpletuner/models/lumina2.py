"""Lumina-Image 2.0: a 2B flow-matching DiT on 16-channel Flux-VAE latents, conditioned on Gemma 2.

Prompts go through Lumina2Pipeline.encode_prompt (its system prompt, then
" <Prompt Start> ", then the caption; Gemma's penultimate hidden states and
the attention mask, 256 tokens unless tokenizer_max_length says otherwise).

Lumina 2 counts time the other way round from the trainer: its transformer
takes t = 1 - sigma (1 = clean image) and predicts latents - noise, so
``predict`` converts the timestep and negates the output to give the
trainer's velocity (noise - latents).
"""

from __future__ import annotations

import torch

from simpletuner.data.types import TrainingBatch
from simpletuner.models.base import Components
from simpletuner.models.registry import register
from simpletuner.models.sana import GemmaFlowFamily
from simpletuner.models.sd import LazyClass

LUMINA2_PROMPT_LENGTH = 256


def cast_input_to_module_dtype(module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: cast the first input to the module's parameter dtype."""
    first, *rest = args
    return (first.to(next(module.parameters()).dtype), *rest)


@register
class Lumina2(GemmaFlowFamily):
    """Lumina-Image 2.0 (Alpha-VLLM): a 2B flow-matching DiT on Flux-VAE latents, conditioned on Gemma 2 (2B)
    with a fixed system prompt in front of every caption. PEFT LoRA (rank 8-32, learning rate 1e-4 to
    5e-5) and full fine-tunes (1e-5 to 1e-6, with max_grad_norm 1.0 and EMA) both work; LoRA files load
    with Lumina2Pipeline.load_lora_weights. Train at 1024px (aspect buckets work well), mixed_precision
    bf16; flow_schedule_auto_shift suits mixed resolutions. Image sides must be multiples of 16 px."""

    name = "lumina2"
    flavours = {"2.0": "Alpha-VLLM/Lumina-Image-2.0"}
    default_flavour = "2.0"
    pipeline_class = LazyClass("diffusers", "Lumina2Pipeline")
    transformer_class = LazyClass("diffusers", "Lumina2Transformer2DModel")
    default_prompt_length = LUMINA2_PROMPT_LENGTH
    patch_pixels = 16
    patch_pixels_reason = "8x VAE, 2x2 patches"

    def _finish_load(self, components: Components, path: str, device: torch.device,
                     scheduler_config: dict | None = None) -> None:
        super()._finish_load(components, path, device, scheduler_config)
        # Lumina2Pipeline hands the VAE latents in the text encoder's dtype without casting them.
        components.vae.decoder.register_forward_pre_hook(cast_input_to_module_dtype)

    def predict(self, batch: TrainingBatch, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The flow velocity (noise - latents) for timesteps = sigma * num_train_timesteps."""
        components = self._loaded()
        device, dtype = noisy_latents.device, noisy_latents.dtype
        steps = components.noise_scheduler.config.num_train_timesteps
        sigmas = timesteps.to(device=device, dtype=torch.float32) / steps
        output = components.denoiser(
            hidden_states=noisy_latents,
            timestep=(1.0 - sigmas).expand(noisy_latents.shape[0]),
            encoder_hidden_states=batch.text["prompt_embeds"].to(device=device, dtype=dtype),
            encoder_attention_mask=batch.text["prompt_attention_mask"].to(device),
            return_dict=False,
        )[0]
        return -output
