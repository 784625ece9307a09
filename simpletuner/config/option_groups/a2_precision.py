"""Weight precision, quantisation, offloading and compile settings: trading speed for memory."""

from simpletuner.config.option_types import BUILT, PLANNED, opt

GROUP = "Precision and memory"

QUANTISATION_LEVELS = (
    "no_change", "int8-quanto", "int4-quanto", "int2-quanto", "int8-torchao", "nf4-bnb", "int4-torchao",
    "fp8-quanto", "fp8uz-quanto", "fp8-torchao",
)
# Quanto levels (fp8 included) and int8-torchao run on a CPU; nf4-bnb needs a bitsandbytes that supports the
# device (recent versions run on CPU too), the two torchao levels an NVIDIA GPU.
QUANTISATION_NEEDS = {"nf4-bnb": "bitsandbytes", "int4-torchao": "cuda", "fp8-torchao": "cuda_fp8"}

_TEXT_ENCODER_PRECISION = [
    opt(f"text_encoder_{index}_precision", "str", "no_change",
        f"Quantisation applied to text encoder {index} when it is loaded; no_change keeps its weights as they "
        "are. Frozen encoders usually lose little quality.",
        choices=QUANTISATION_LEVELS, gated_choices=QUANTISATION_NEEDS, status=BUILT)
    for index in range(1, 5)
]

OPTIONS = [
    # Quantisation
    opt("base_model_precision", "str", "no_change",
        "Quantise the frozen denoiser weights to save memory (quanto, torchao or bitsandbytes backends); "
        "no_change keeps them at their loaded precision. A .gguf denoiser file is quantised already.",
        choices=QUANTISATION_LEVELS, gated_choices=QUANTISATION_NEEDS, status=BUILT),
    *_TEXT_ENCODER_PRECISION,
    opt("base_model_default_dtype", "str", "bf16",
        "Precision of the base-model weights that quantisation leaves unquantised.",
        choices=("bf16", "fp32"), status=PLANNED),
    opt("quantize_via", "str", "cpu",
        "Where quantisation happens: on the CPU after loading (slow but light on VRAM), on the accelerator "
        "after loading (faster, may run out of memory), or inside the diffusers/transformers loaders while "
        "the weights are read (pipeline; the bitsandbytes denoiser loader needs a GPU).",
        choices=("cpu", "accelerator", "pipeline"), status=BUILT),
    opt("quantization_config", "str", None,
        "For quantize_via=pipeline: quantisation-config overrides as inline JSON or a JSON file path, keyed by "
        "component (unet or transformer, text_encoder, text_encoder_2 ..., or default for the rest); each entry "
        "holds config keywords and optionally quant_method (bitsandbytes, quanto or torchao).", status=BUILT),
    opt("vae_dtype", "str", "bf16",
        "Precision the VAE runs in while encoding and decoding; default keeps the model's own dtype.",
        choices=("default", "fp32", "fp16", "bf16"), status=BUILT),
    # Gradient checkpointing
    opt("gradient_checkpointing", "bool", False,
        "Recompute activations during the backward pass instead of keeping them, lowering peak memory at "
        "the cost of slower steps.", status=BUILT),
    opt("gradient_checkpointing_interval", "int", None,
        "Only checkpoint every Nth block (1 is the same as every block); supported by a few families such as "
        "SDXL and Flux.", status=BUILT),
    opt("gradient_checkpointing_backend", "str", "torch",
        "How checkpointed activations are handled: recomputed by PyTorch (torch), or copied to CPU memory "
        "asynchronously (unsloth, CUDA only).",
        choices=("torch", "unsloth"), gated_choices={"unsloth": "cuda"}, planned_choices=("unsloth",),
        status=BUILT),
    # Offloading
    opt("offload_during_startup", "bool", False,
        "Park the text encoders on the CPU while the VAE cache is built, so large models fit during startup; "
        "startup gets slower.", status=BUILT),
    opt("offload_during_save", "bool", False,
        "Move the models (trained model, denoiser, VAE, loaded text encoders, an accelerator-held EMA copy) to "
        "the CPU while each checkpoint and the final result are saved, then back, to avoid out-of-memory "
        "errors while quantised weights are serialised; saves get slower.", status=BUILT),
    opt("enable_model_cpu_offload", "bool", False,
        "Keep the text encoders on the CPU and move each to the accelerator only while it encodes (the VAE "
        "is parked once latents are cached). Cannot be combined with enable_group_offload.", status=BUILT),
    opt("enable_group_offload", "bool", False,
        "Keep the denoiser's frozen weights on the CPU (or disk) and bring them to the accelerator group by "
        "group while each runs (LoRA training). Cannot be combined with enable_model_cpu_offload or ramtorch.",
        status=BUILT),
    opt("group_offload_type", "str", "block_level",
        "Granularity of group offloading: whole blocks of the model's block lists, other layers staying "
        "resident (balanced), or individual leaf layers (least memory, most transfers).", choices=("block_level", "leaf_level"), status=BUILT),
    opt("group_offload_blocks_per_group", "int", 1,
        "With block_level offloading, how many blocks move together; more means fewer transfers but more "
        "memory in use.", status=BUILT),
    opt("group_offload_use_stream", "bool", False,
        "Copy the next offloaded group on a separate CUDA stream while the current one computes (CUDA "
        "only).", choices=(False, True), gated_choices={True: "cuda"}, status=BUILT),
    opt("group_offload_to_disk_path", "str", None,
        "Folder where offloaded groups are written instead of being kept in CPU memory; use a fast local "
        "disk.", status=BUILT),
    opt("musubi_blocks_to_swap", "int", 0,
        "Keep the last N transformer blocks on another device and stream their weights in block by block "
        "(transformer models with a block list, not UNets; LoRA training); 0 turns it off.", status=BUILT),
    opt("musubi_block_swap_device", "str", "cpu",
        "Device that holds the swapped blocks, such as cpu or cuda:1; used only when musubi_blocks_to_swap "
        "is above 0.", status=BUILT),
    # RamTorch
    opt("ramtorch", "bool", False,
        "Swap Linear layers for RamTorch versions whose weights live in CPU memory and stream to the GPU "
        "(CUDA/ROCm only; not with group offloading). Implies set_grads_to_none.", status=PLANNED, requires="ramtorch"),
    opt("ramtorch_target_modules", "str", None,
        "Comma-separated glob patterns of module or class names to convert with RamTorch; unset converts "
        "every Linear layer.", status=PLANNED, requires="ramtorch"),
    opt("ramtorch_text_encoder", "bool", False,
        "Also convert the text encoders' Linear layers to RamTorch.", status=PLANNED, requires="ramtorch"),
    opt("ramtorch_vae", "bool", False,
        "Experimental: convert the Linear layers of the VAE mid-block to RamTorch; convolutions stay as "
        "they are.", status=PLANNED, requires="ramtorch"),
    opt("ramtorch_controlnet", "bool", False,
        "Also convert the ControlNet's Linear layers to RamTorch when one is trained.", status=PLANNED, requires="ramtorch"),
    opt("ramtorch_transformer_percent", "int", 100,
        "Share (0-100) of the transformer's eligible Linear layers, counted from the start, that RamTorch "
        "offloads.", status=PLANNED, requires="ramtorch"),
    opt("ramtorch_text_encoder_percent", "int", 100,
        "Share (0-100) of text-encoder Linear layers offloaded when ramtorch_text_encoder is on.",
        status=PLANNED, requires="ramtorch"),
    opt("ramtorch_disable_sync_hooks", "bool", False,
        "Drop the synchronisation hooks placed after RamTorch layers; faster, but outputs may become "
        "non-deterministic or wrong.", status=PLANNED, requires="ramtorch"),
    opt("ramtorch_disable_extensions", "bool", True,
        "Limit RamTorch to Linear layers; set false to also offload Embedding, norm and Conv layers.",
        status=PLANNED, requires="ramtorch"),
    # Attention and other memory switches
    opt("unet_attention_slice", "bool", False,
        "Compute UNet attention in slices (UNet families only) to lower peak memory.", status=BUILT),
    opt("accelerator_cache_clear_interval", "int", None,
        "Empty the accelerator's memory cache every N steps to fight fragmentation; unset or 0 never does.",
        status=PLANNED),
    opt("fuse_qkv_projections", "bool", False,
        "Fuse the query/key/value projections of attention into one matmul; pays off with Flash Attention 3 "
        "on Hopper GPUs and falls back to PyTorch SDPA elsewhere.", status=PLANNED, requires="flash_attn_3"),
    opt("sla_config", "str", None,
        "Runtime overrides for the sla attention backend, as JSON or a Python dict literal, e.g. "
        "{\"topk\": 0.15, \"blkq\": 32}.", status=PLANNED),
    # torch.compile (TorchDynamo)
    opt("dynamo_backend", "str", "no",
        "torch.compile backend for the training model, such as inductor, aot_eager or cudagraphs; no turns "
        "compilation off. Also read from TRAINING_DYNAMO_BACKEND.", status=BUILT),
    opt("dynamo_mode", "str", None,
        "torch.compile optimisation mode; unset lets the backend choose.",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"), status=BUILT),
    opt("dynamo_fullgraph", "bool", False,
        "Require torch.compile to capture each model as one graph, failing instead of splitting it.",
        status=BUILT),
    opt("dynamo_dynamic", "bool", False,
        "Compile with dynamic-shape guards so changing input sizes do not trigger recompilation.",
        status=BUILT),
    opt("dynamo_use_regional_compilation", "bool", False,
        "Compile repeated blocks once and reuse the result, shortening compile time on deep transformers.",
        status=BUILT),
]
