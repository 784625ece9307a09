"""Optimizer tuning, numeric precision, attention backends, freezing and process-level settings."""

from simpletuner.config.option_types import BUILT, PLANNED, opt

GROUP = "Optimizer and precision"

_ATTENTION_BACKENDS = (
    "diffusers", "xformers", "flash-attn", "flash-attn-2", "flash-attn-3", "flash-attn-3-varlen", "flex",
    "cudnn", "native-efficient", "native-flash", "native-math", "native-npu", "native-xla", "sla",
    "sageattention", "sageattention-int8-fp16-triton", "sageattention-int8-fp16-cuda",
    "sageattention-int8-fp8-cuda",
)

# Backends that cannot run on a plain CPU. native-flash is left out on purpose: torch ships a CPU
# flash kernel for SDPA. native-efficient and cudnn have no CPU implementation.
_ATTENTION_REQUIREMENTS = {
    "xformers": "xformers",
    "flash-attn": "flash_attn",
    "flash-attn-2": "flash_attn",
    "flash-attn-3": "flash_attn_3",
    "flash-attn-3-varlen": "flash_attn_3",
    "cudnn": "cuda",
    "flex": "cuda",  # FlexAttention has no backward pass on CPU
    "native-efficient": "cuda",
    "native-npu": "npu",
    "native-xla": "xla",
    "sla": "cuda",
    "sageattention": "sageattention",
    "sageattention-int8-fp16-triton": "sageattention",
    "sageattention-int8-fp16-cuda": "sageattention",
    "sageattention-int8-fp8-cuda": "sageattention",
}

OPTIONS = [
    # Precision and kernels
    opt("mixed_precision", "str", "bf16",
        "Number format used for the forward and backward computation; no keeps full fp32.",
        choices=("no", "fp16", "bf16", "fp8"), gated_choices={"fp8": "cuda_fp8"}, status=BUILT),
    opt("attention_mechanism", "str", "diffusers",
        "Attention kernel to use. diffusers is PyTorch's standard SDPA; the others select vendor or "
        "package kernels and some need particular GPUs or packages.",
        choices=_ATTENTION_BACKENDS, gated_choices=_ATTENTION_REQUIREMENTS, planned_choices=("sla",),
        status=BUILT),
    opt("sageattention_usage", "str", "inference",
        "Where SageAttention is used. Its kernels pass no gradients to the QKV projections, so enabling "
        "it for training leaves those layers untrained.",
        choices=("training", "inference", "training+inference"), status=BUILT),
    opt("disable_tf32", "bool", False,
        "Keep fp32 matrix maths in full IEEE precision instead of allowing TF32 on GPUs that support it.",
        status=BUILT),
    opt("gradient_precision", "str", "unmodified",
        "Keep gradients in the training dtype, or accumulate them in fp32.",
        choices=("unmodified", "fp32"), status=BUILT),
    opt("quantize_activations", "bool", False,
        "Also quantize activations, not just weights, when the base model is quantized (hurts quality).",
        status=PLANNED),
    # Optimizer hyper-parameters
    opt("adam_beta1", "float", 0.9, "First-moment (momentum) decay for Adam-style optimizers.",
        status=BUILT),
    opt("adam_beta2", "float", 0.999, "Second-moment (variance) decay for Adam-style optimizers.",
        status=BUILT),
    opt("optimizer_beta1", "float", None,
        "First beta for any optimizer that takes betas; overrides the optimizer's own default.",
        status=BUILT),
    opt("optimizer_beta2", "float", None,
        "Second beta for any optimizer that takes betas; overrides the optimizer's own default.",
        status=BUILT),
    opt("adam_weight_decay", "float", 1e-2, "Weight decay for Adam-family optimizers.", status=BUILT),
    opt("adam_epsilon", "float", 1e-8,
        "Small constant in the Adam denominator that keeps updates finite.", status=BUILT),
    opt("prodigy_steps", "int", None,
        "Stop Prodigy adjusting its step size after this many steps; unset lets it adapt throughout.",
        status=BUILT),
    opt("max_grad_norm", "float", 2.0,
        "Gradient clipping threshold; 0 turns clipping off.", status=BUILT),
    opt("grad_clip_method", "str", "value",
        "Clip each gradient element to +/- max_grad_norm, or rescale the whole gradient so its norm is "
        "at most max_grad_norm.",
        choices=("value", "norm"), status=BUILT),
    opt("set_grads_to_none", "bool", False,
        "Free gradients between steps (set them to None) rather than filling them with zeros.",
        status=BUILT),
    # Optimizer memory
    opt("optimizer_cpu_offload_method", "str", "none",
        "How optimizer state is moved to CPU memory; only none is offered.", choices=("none",),
        status=PLANNED),
    opt("optimizer_offload_gradients", "bool", False,
        "When optimizer state is offloaded, move gradients to CPU memory too.", status=PLANNED),
    opt("fuse_optimizer", "bool", False,
        "Use fused optimizer kernels while offloading to cut memory overhead.", status=PLANNED),
    opt("optimizer_release_gradients", "bool", False,
        "With optimi optimizers, drop each gradient right after its parameter is updated.",
        status=BUILT),
    # Learning rate
    opt("lr_end", "float", 4e-7,
        "Learning rate that the polynomial schedule decays to by the final step.", status=BUILT),
    opt("lr_scale", "bool", False,
        "Multiply the learning rate by GPUs x gradient accumulation steps x batch size.", status=BUILT),
    opt("lr_scale_sqrt", "bool", False,
        "With lr_scale, multiply by the square root of that product instead.", status=BUILT),
    # Freezing
    opt("layer_freeze_strategy", "str", "none",
        "Which parameters to freeze: none, or bitfit (train only the bias terms).",
        choices=("none", "bitfit"), status=BUILT),
    opt("freeze_encoder_strategy", "str", "after",
        "When the text encoder is trained, freeze its layers before, between or after the indices given "
        "by freeze_encoder_before and freeze_encoder_after.",
        choices=("before", "between", "after"), status=BUILT),
    opt("freeze_encoder_before", "int", 12,
        "Text-encoder layer index below which layers are frozen (before/between strategies).",
        status=BUILT),
    opt("freeze_encoder_after", "int", 17,
        "Text-encoder layer index above which layers are frozen (after/between strategies).",
        status=BUILT),
    # Text encoder handling
    opt("fully_unload_text_encoder", "bool", False,
        "Delete the text encoders from memory entirely once their embeddings are cached; validation and a "
        "full model's final save load them again for their duration. Not with train_text_encoder.",
        status=BUILT),
    opt("save_text_encoder", "bool", False,
        "Include the text encoder in the saved model at the end of training.", status=PLANNED),
    opt("text_encoder_limit", "int", 25,
        "When training the text encoder, stop updating it after this percentage of the run.",
        status=BUILT),
    # Run-level
    opt("ignore_final_epochs", "bool", False,
        "Let max_train_steps decide when training ends even if the epoch count is reached first.",
        status=BUILT),
    opt("ema_validation", "str", "comparison",
        "How EMA weights appear in validation: not at all, instead of the trained weights, or side by "
        "side with them.",
        choices=("none", "ema_only", "comparison"), status=BUILT),
    opt("seed_for_each_device", "bool", True,
        "Give every process its own seed derived from seed (repeatable across runs); off shares one seed, "
        "which makes GPUs draw the same samples.", status=BUILT),
    opt("local_rank", "int", -1,
        "Process rank on this node, normally set by the launcher; -1 means not distributed.",
        status=BUILT),
    opt("offload_param_path", "str", None,
        "Directory for DeepSpeed ZeRO NVMe offload files (its nvme_path when the DeepSpeed config offloads "
        "parameters or optimizer state to nvme); use a fast, roomy disk.", requires="deepspeed", status=BUILT),
]
