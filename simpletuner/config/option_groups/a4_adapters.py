"""LoRA, LyCORIS and related adapter settings (used when model_type is lora)."""

from simpletuner.config.option_types import BUILT, PLANNED, opt

GROUP = "LoRA and adapters"

FLUX_LORA_TARGETS = (
    "mmdit", "context", "context+ffs", "all", "all+ffs", "ai-toolkit", "tiny", "nano", "controlnet",
    "all+ffs+embedder", "all+ffs+embedder+controlnet",
)

OPTIONS = [
    opt("lora_type", "str", "standard",
        "Adapter implementation: PEFT LoRA (standard) or a LyCORIS network described by lycoris_config.",
        choices=("standard", "lycoris"), status=BUILT),
    opt("lora_rank", "int", 16,
        "Inner dimension of the LoRA matrices; higher ranks learn more and make larger files.",
        status=BUILT),
    opt("lora_alpha", "float", None,
        "LoRA scaling numerator (the update is scaled by alpha / rank); unset uses the rank, i.e. a scale "
        "of 1.", status=BUILT),
    opt("lora_dropout", "float", 0.1,
        "Dropout probability applied inside the LoRA layers during training, to curb overfitting.",
        status=BUILT),
    opt("lora_init_type", "str", "default",
        "How the LoRA weights are initialised before training.",
        choices=("default", "gaussian", "loftq", "olora", "pissa"), status=BUILT),
    opt("lora_format", "str", "diffusers",
        "Key layout of saved LoRA files: diffusers/PEFT names, or ComfyUI-style diffusion_model.* keys with "
        "alpha tensors.", choices=("diffusers", "comfyui"), status=BUILT),
    opt("use_dora", "bool", False,
        "Train weight-decomposed LoRA (DoRA), which learns a separate magnitude per output; slower.",
        status=BUILT),
    opt("peft_lora_mode", "str", "standard",
        "PEFT LoRA variant: the usual two-matrix form or SingLoRA's single symmetric matrix.",
        choices=("standard", "singlora"), status=PLANNED,
        unbuilt_reason="SingLoRA needs a PEFT release with a SingLoRA layer (the installed peft has none), "
                       "and without it the adapter could not be saved in a form diffusers loads."),
    opt("singlora_ramp_up_steps", "int", 0,
        "SingLoRA only: steps over which the adapter's contribution ramps up from zero; 0 skips the ramp.",
        status=PLANNED, unbuilt_reason="It only applies to peft_lora_mode=singlora, which is not built."),
    opt("peft_lora_target_modules", "str", None,
        "JSON array of module names for PEFT LoRA to wrap (or a path to a JSON file holding one), e.g. "
        '["to_q", "to_k"]. Replaces the family\'s preset targets.', status=BUILT),
    opt("flux_lora_target", "str", "all",
        "Flux only: which group of layers the LoRA wraps, from attention-only presets up to feed-forward "
        "and embedder layers.", choices=FLUX_LORA_TARGETS, status=BUILT),
    opt("slider_lora_target", "bool", False,
        "Aim standard PEFT LoRA at slider-friendly layers (self-attention plus conv/time embeddings).",
        status=PLANNED),
    opt("init_lora", "str", None,
        "LoRA or LyCORIS .safetensors file whose weights seed the new adapter.", status=BUILT),
    opt("lycoris_config", "str", "config/lycoris_config.json",
        "Path to the JSON file describing the LyCORIS network (algorithm, factors, targets).",
        status=BUILT),
    opt("init_lokr_norm", "float", None,
        "LyCORIS LoKr only: start from a perturbed normal initialisation with this scale (around 1e-4 "
        "speeds up early training).", status=BUILT),
]
