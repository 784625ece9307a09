"""OmniGen: a Phi-3 style transformer that reads prompt tokens itself, trained with flow matching on SDXL-VAE latents.

There is no text encoder: the transformer embeds token ids with its own
embedding table. The text cache therefore holds token ids, not embeddings:
``encode_text`` runs each caption through OmniGenPipeline's own multimodal
processor (which wraps it in OmniGen's chat template: user turn, "Generate an
image according to the following instructions", the caption, assistant turn,
``<|diffusion|>``), left-pads the ids to ``tokenizer_max_length`` (default
256) with the pad id the pipeline's collator uses, and stores ``input_ids``
and ``attention_mask`` (1 = real token). ``predict`` strips the padding again
and builds the causal/bidirectional attention mask and position ids with the
pipeline's collator for the batch's image size, so training sees exactly the
sequence inference builds. Only text-to-image training is supported.

Time runs like the pipeline's scheduler, which OmniGen ships with
invert_sigmas=true and num_train_timesteps=1: the transformer takes
t = 1 - sigma (1 = clean image) and predicts latents - noise, so ``predict``
converts the trainer's timestep and negates the output to give the trainer's
velocity (noise - latents). A scheduler without invert_sigmas is followed too.
"""

from __future__ import annotations

from typing import Any

import torch

from simpletuner.config.settings import Settings
from simpletuner.data.types import TrainingBatch
from simpletuner.models.pixart import (
    TransformerFamilyLoading, alignment_problem, identity_digest, prompt_length_problem,
)
from simpletuner.models.registry import register
from simpletuner.models.sana import GemmaFlowFamily
from simpletuner.models.sd import LazyClass, UNetLatentFamily

OMNIGEN_PROMPT_LENGTH = 256  # token positions cached per prompt (template + caption)
# Phi-3's attention and MLP projections inside each OmniGen block.
OMNIGEN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# The pad id OmniGenPipeline's collator (OmniGenCollator) uses; padded positions are masked out.
COLLATOR_PAD_ID = 2
TRAINING_TIMESTEPS = 1000
TOKEN_PIXELS = 16  # 8x VAE downsampling, 2x2 patches: one image token per 16x16 pixels


def pad_token_ids(token_lists: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad (as OmniGen's collator does) to ``length``: (input_ids, attention_mask), both (B, length) long."""
    ids = torch.full((len(token_lists), length), COLLATOR_PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(token_lists), length), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        if len(tokens) > length:
            raise ValueError(f"an OmniGen prompt is {len(tokens)} tokens after its chat template, more than "
                             f"tokenizer_max_length={length}; raise tokenizer_max_length or shorten the caption")
        ids[row, length - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[row, length - len(tokens):] = 1
    return ids, mask


def unpadded_token_lists(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """The cached ids of each prompt without its padding."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(input_ids.cpu(), attention_mask.cpu())]


@register
class OmniGen(TransformerFamilyLoading, UNetLatentFamily):
    """OmniGen v1: a 3.8B Phi-3 based transformer that embeds prompt tokens itself (no text encoder, only a
    tokenizer), flow matching on SDXL-VAE latents. Only text-to-image training is built. The text cache holds
    the processed token ids and their padding mask (tokenizer_max_length positions, default 256), not
    embeddings. diffusers' OmniGenPipeline has no LoRA loader and the transformer has no load_lora_adapter,
    so with model_type=lora use lora_type=lycoris (a LoKr preset is provided); model_type=full saves a
    pipeline that OmniGenPipeline.from_pretrained loads. Image sides must be multiples of 16 px."""

    name = "omnigen"
    flavours = {"v1": "Shitao/OmniGen-v1-diffusers"}
    default_flavour = "v1"
    default_prediction_type = "flow_matching"
    flow_matching = True
    valid_prediction_types = ("flow_matching",)
    denoiser_subfolder = "transformer"
    default_lora_targets = OMNIGEN_LORA_TARGETS
    pipeline_class = LazyClass("diffusers", "OmniGenPipeline")
    transformer_class = LazyClass("diffusers", "OmniGenTransformer2DModel")
    img2img_pipeline_class = None
    text_encoder_attributes = ()
    supports_text_encoder_training = False
    # Classifier-free guidance on an image reference does not apply to text-to-image renders.
    pipeline_call_extras = {"img_guidance_scale": 1.0}

    # --- identity ---
    def prompt_length(self) -> int:
        return int(self.settings.tokenizer_max_length or OMNIGEN_PROMPT_LENGTH)

    def fingerprint(self) -> str:
        s = self.settings
        return identity_digest(self.name, [self.name, self.model_path(s), s.revision, s.variant,
                                           s.pretrained_vae_model_name_or_path, self.prompt_length()])

    @classmethod
    def check_settings(cls, settings: Settings) -> list[str]:
        problems = super().check_settings(settings)
        if settings.model_type == "lora" and settings.lora_type == "standard":
            problems.append(
                "model_family=omnigen cannot train a PEFT LoRA (lora_type=standard): diffusers' OmniGenPipeline "
                "has no LoRA loader, so the result could not be used. Set lora_type=lycoris (with a "
                "lycoris_config file), or model_type=full"
            )
        if settings.train_text_encoder:
            problems.append("train_text_encoder does not apply to model_family=omnigen (it has no text encoder; "
                            "the transformer embeds the tokens); set train_text_encoder to false")
        problems += prompt_length_problem(settings, cls.name, minimum=32)
        problems += alignment_problem(settings, cls.name, TOKEN_PIXELS, "8x VAE, 2x2 patches")
        return problems

    # --- loading ---
    def _load_text_encoders(self, path: str, weight_dtype: torch.dtype) -> tuple[list, list]:
        """Only the tokenizer: OmniGen has no text encoder."""
        from transformers import AutoTokenizer

        revision = {"revision": self.settings.revision} if self.settings.revision else {}
        return [AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **revision)], []

    def _training_scheduler(self, scheduler_config: dict):
        """1000 training timesteps (the shipped scheduler counts 1): sigmas come from the flow_* options."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=TRAINING_TIMESTEPS)

    _inference_scheduler = GemmaFlowFamily._inference_scheduler

    # --- text ---
    def _processor(self):
        from diffusers.pipelines.omnigen.processor_omnigen import OmniGenMultiModalProcessor

        return OmniGenMultiModalProcessor(self._loaded().tokenizers[0])

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask (B, L): the pipeline processor's ids for each caption, left-padded."""
        processor = self._processor()
        tokens = [processor.process_multi_modal_prompt(prompt, None)["input_ids"] for prompt in prompts]
        input_ids, attention_mask = pad_token_ids(tokens, self.prompt_length())
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def sequence_inputs(self, text: dict[str, torch.Tensor], pixel_size: tuple[int, int],
                        device: torch.device) -> dict[str, Any]:
        """The transformer's token inputs for a batch, built by the pipeline's collator as inference does."""
        from diffusers.pipelines.omnigen.processor_omnigen import OmniGenCollator

        collator = OmniGenCollator(pad_token_id=COLLATOR_PAD_ID,
                                   hidden_size=self._loaded().denoiser.config.hidden_size)
        prompts = [{"input_ids": ids, "pixel_values": None, "image_sizes": None}
                   for ids in unpadded_token_lists(text["input_ids"], text["attention_mask"])]
        ids, positions, mask, _, _, _ = collator.process_mllm_input(prompts, [list(pixel_size)] * len(prompts))
        return {"input_ids": ids.to(device), "position_ids": positions.to(device),
                "attention_mask": mask.to(device), "input_img_latents": [], "input_image_sizes": {}}

    # --- training ---
    def predict(self, batch: TrainingBatch, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The flow velocity (noise - latents) for timesteps = sigma * the training scheduler's steps."""
        components = self._loaded()
        device = noisy_latents.device
        sigmas = timesteps.to(device=device, dtype=torch.float32) / components.noise_scheduler.config.num_train_timesteps
        shipped = components.extras["inference_scheduler"].config
        inverted = bool(shipped.get("invert_sigmas", False))
        model_time = (1.0 - sigmas if inverted else sigmas) * shipped.num_train_timesteps
        height, width = noisy_latents.shape[-2:]
        vae_scale = 2 ** (len(components.vae.config.block_out_channels) - 1)
        inputs = self.sequence_inputs(batch.text, (height * vae_scale, width * vae_scale), device)
        output = components.denoiser(
            hidden_states=noisy_latents,
            timestep=model_time.expand(noisy_latents.shape[0]),
            return_dict=False,
            **inputs,
        )[0]
        return -output if inverted else output

    # --- inference and saving ---
    def pipeline_call_arguments(self) -> dict[str, Any]:
        return dict(self.pipeline_call_extras)

    def _pipeline_parts(self, denoiser: torch.nn.Module | None) -> dict[str, Any]:
        components = self._loaded()
        return {"transformer": denoiser if denoiser is not None else components.denoiser,
                "vae": components.vae, "tokenizer": components.tokenizers[0], "scheduler": None}

    def save_lora(self, output_dir: str, denoiser_lora_state: dict[str, torch.Tensor],
                  text_encoder_lora_states: dict[str, dict[str, torch.Tensor]] | None = None,
                  adapter_metadata: dict[str, dict] | None = None) -> None:
        raise ValueError("model_family=omnigen cannot save a PEFT LoRA: OmniGenPipeline has no LoRA loader. "
                         "Train with lora_type=lycoris or model_type=full.")
