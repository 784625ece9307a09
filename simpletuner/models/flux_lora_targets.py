"""Which Flux transformer layers a PEFT LoRA wraps, per ``flux_lora_target``.

Names are module-name suffixes in diffusers' FluxTransformer2DModel, matched
the way PEFT matches ``target_modules`` (a whole name or a ``.``-separated
tail). Layer map of the model, for reading the presets:

- double-stream blocks (``transformer_blocks.N``): image attention
  ``attn.to_q/to_k/to_v/to_out.0``, text ("context") attention
  ``attn.add_q_proj/add_k_proj/add_v_proj/to_add_out``, feed-forwards
  ``ff.net.0.proj/ff.net.2`` (image) and ``ff_context.net.*`` (text), and the
  modulation layers ``norm1.linear`` / ``norm1_context.linear``;
- single-stream blocks (``single_transformer_blocks.N``): ``attn.to_q/to_k/to_v``,
  ``proj_mlp``, ``proj_out`` and the modulation ``norm.linear``;
- the input embedders ``x_embedder`` (image patches) and ``context_embedder`` (T5).
"""

from __future__ import annotations

IMAGE_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CONTEXT_ATTENTION = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
CONTEXT_FEED_FORWARD = ("ff_context.net.0.proj", "ff_context.net.2")
FEED_FORWARDS = ("ff.net.0.proj", "ff.net.2", *CONTEXT_FEED_FORWARD, "proj_mlp", "proj_out")
MODULATION = ("norm.linear", "norm1.linear", "norm1_context.linear")
EMBEDDERS = ("x_embedder", "context_embedder")

# flux_lora_target -> module names. "tiny" and "nano" are the one or two single-stream
# output projections that community LoRAs found to carry most of a style; they need
# the full-size model (at least 8 or 21 single-stream blocks).
FLUX_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "mmdit": IMAGE_ATTENTION,
    "context": CONTEXT_ATTENTION,
    "context+ffs": CONTEXT_ATTENTION + CONTEXT_FEED_FORWARD,
    "all": IMAGE_ATTENTION + CONTEXT_ATTENTION,
    "all+ffs": IMAGE_ATTENTION + CONTEXT_ATTENTION + FEED_FORWARDS,
    "ai-toolkit": IMAGE_ATTENTION + CONTEXT_ATTENTION + FEED_FORWARDS + MODULATION,
    "all+ffs+embedder": IMAGE_ATTENTION + CONTEXT_ATTENTION + FEED_FORWARDS + EMBEDDERS,
    "tiny": ("single_transformer_blocks.7.proj_out", "single_transformer_blocks.20.proj_out"),
    "nano": ("single_transformer_blocks.7.proj_out",),
}

# Choices that only mean something for a Flux ControlNet (controlnet=true): "controlnet" trains just the
# ControlNet's own layers, the other adds them to the all+ffs+embedder LoRA on its copied blocks.
CONTROLNET_FLUX_LORA_TARGETS = {"controlnet": (), "all+ffs+embedder+controlnet": FLUX_LORA_TARGETS["all+ffs+embedder"]}

DEFAULT_FLUX_LORA_TARGET = "all"


def flux_lora_targets(choice: str | None) -> list[str]:
    """The module names for a flux_lora_target value (unset means the default, ``all``)."""
    choice = choice or DEFAULT_FLUX_LORA_TARGET
    if choice in CONTROLNET_FLUX_LORA_TARGETS:
        raise ValueError(f"flux_lora_target={choice} applies to ControlNet training; set controlnet=true, or "
                         f"choose one of: {', '.join(FLUX_LORA_TARGETS)}")
    if choice not in FLUX_LORA_TARGETS:
        raise ValueError(f"flux_lora_target={choice!r} is not a Flux LoRA preset; choose one of: "
                         f"{', '.join(FLUX_LORA_TARGETS)}")
    return list(FLUX_LORA_TARGETS[choice])


def flux_controlnet_lora_targets(choice: str | None) -> list[str]:
    """LoRA targets on a Flux ControlNet's copied blocks; its own layers (controlnet_*) always train in full."""
    choice = choice or DEFAULT_FLUX_LORA_TARGET
    if choice in CONTROLNET_FLUX_LORA_TARGETS:
        return list(CONTROLNET_FLUX_LORA_TARGETS[choice])
    return flux_lora_targets(choice)
