"""Part A of the option table: every listed name, its kind and choices, reference defaults, aliases, gating."""

import pytest

from simpletuner.config.hardware import REQUIREMENTS
from simpletuner.config.option_groups import (
    a1_model, a2_precision, a3_training, a4_adapters, a5_data, a6_validation,
)
from simpletuner.config.options import OPTIONS, canonical_name
from simpletuner.config.settings import Settings
from simpletuner.config.values import convert

PART_A_MODULES = (a1_model, a2_precision, a3_training, a4_adapters, a5_data, a6_validation)

# Written `[--name [NAME]]` in the reference usage listing: optional-value booleans.
FLAGS = set("""
controlnet vae_cache_ondemand vae_cache_disable offload_during_startup fuse_qkv_projections control
unet_attention_slice gradient_checkpointing train_text_encoder use_soft_min_snr use_ema ema_cpu_only
ema_foreach_disable slider_lora_target use_dora ignore_missing_files vae_enable_slicing vae_enable_tiling
vae_enable_patch_conv disable_benchmark eval_dataset_pooling validation_on_startup validation_using_datasets
validation_torch_compile validation_randomize validation_disable validation_prompt_library
validation_disable_unconditional validation_audio_only i_know_what_i_am_doing flux_fast_schedule
flow_use_uniform_schedule flow_use_beta_schedule flow_schedule_auto_shift
""".split())

QUANTISATION = ("no_change", "int8-quanto", "int4-quanto", "int2-quanto", "int8-torchao", "nf4-bnb",
                "int4-torchao", "fp8-quanto", "fp8uz-quanto", "fp8-torchao")
# Choices exactly as the usage listing orders them.
CHOICES = {
    "model_type": ("full", "lora"),
    "prediction_type": ("epsilon", "v_prediction", "sample", "flow_matching"),
    "vae_dtype": ("default", "fp32", "fp16", "bf16"),
    "aspect_bucket_rounding": tuple(range(1, 10)),
    "base_model_precision": QUANTISATION,
    **{f"text_encoder_{i}_precision": QUANTISATION for i in range(1, 5)},
    "quantize_via": ("cpu", "accelerator", "pipeline"),
    "base_model_default_dtype": ("bf16", "fp32"),
    "optimizer": ("adamw_bf16", "ao-adamw8bit", "ao-adamw4bit", "ao-adamfp8", "ao-adamwfp8", "adamw_schedulefree",
                  "adamw_schedulefree+aggressive", "adamw_schedulefree+no_kahan", "optimi-stableadamw",
                  "optimi-adamw", "optimi-lion", "optimi-radam", "optimi-ranger", "optimi-adan", "optimi-adam",
                  "optimi-sgd", "soap", "prodigy"),
    "lr_scheduler": ("linear", "sine", "cosine", "cosine_with_restarts", "polynomial", "constant",
                     "constant_with_warmup"),
    "ema_device": ("accelerator", "cpu"),
    "lora_type": ("standard", "lycoris"),
    "lora_init_type": ("default", "gaussian", "loftq", "olora", "pissa"),
    "peft_lora_mode": ("standard", "singlora"),
    "flux_lora_target": ("mmdit", "context", "context+ffs", "all", "all+ffs", "ai-toolkit", "tiny", "nano",
                         "controlnet", "all+ffs+embedder", "all+ffs+embedder+controlnet"),
    "resolution_type": ("pixel", "area", "pixel_area"),
    "caption_strategy": ("filename", "textfile", "instance_prompt", "parquet"),
    "conditioning_multidataset_sampling": ("combined", "random"),
    "vae_cache_scan_behaviour": ("recreate", "sync"),
    "evaluation_type": ("none", "clip"),
    "validation_stitch_input_location": ("left", "right"),
    "validation_noise_scheduler": ("ddim", "ddpm", "euler", "euler-a", "unipc", "dpm++", "perflow"),
    "validation_seed_source": ("cpu", "gpu"),
    # Choices the prose sections enumerate.
    "lora_format": ("diffusers", "comfyui"),
    "group_offload_type": ("block_level", "leaf_level"),
    "gradient_checkpointing_backend": ("torch", "unsloth"),
    "scheduled_sampling_strategy": ("uniform", "biased_early", "biased_late"),
    "scheduled_sampling_ramp_shape": ("linear", "cosine"),
    "scheduled_sampling_sampler": ("unipc", "euler", "dpm", "rk4"),
}
MODEL_FAMILIES = ("kolors", "auraflow", "omnigen", "flux", "deepfloyd", "cosmos2image", "sana", "qwen_image",
                  "pixart_sigma", "sdxl", "sd1x", "sd2x", "wan", "hidream", "sd3", "lumina2", "ltxvideo")

# Defaults the reference states outright (prose sections, help text, quickstarts).
REFERENCE_DEFAULTS = {
    "model_type": "lora", "lora_format": "diffusers", "quantize_via": "cpu", "resolution": 1024,
    "ema_device": "cpu", "vae_cache_scan_behaviour": "recreate", "group_offload_type": "block_level",
    "group_offload_blocks_per_group": 1, "group_offload_use_stream": False, "musubi_blocks_to_swap": 0,
    "musubi_block_swap_device": "cpu", "ramtorch_transformer_percent": 100, "ramtorch_disable_extensions": True,
    "ramtorch_disable_sync_hooks": False, "gradient_checkpointing_backend": "torch", "diff2flow_enabled": False,
    "scheduled_sampling_max_step_offset": 0, "scheduled_sampling_strategy": "uniform",
    "scheduled_sampling_probability": 0.0, "scheduled_sampling_prob_end": 0.5, "scheduled_sampling_order": 2,
    "scheduled_sampling_sampler": "unipc", "scheduled_sampling_reflexflow_beta1": 10.0,
    "flow_beta_schedule_alpha": 2.0, "flow_beta_schedule_beta": 2.0, "flow_schedule_shift": 3.0,
    "dynamo_backend": "no", "dynamo_mode": None, "lr_scheduler": "cosine",
}


def part_a_options():
    return [entry for module in PART_A_MODULES for entry in module.OPTIONS]


def test_part_a_holds_exactly_the_186_listed_names():
    names = [entry.name for entry in part_a_options()]
    assert len(names) == len(set(names)) == 186
    assert all(OPTIONS[name].group for name in names)
    assert FLAGS | set(CHOICES) | {"model_family"} <= set(names)


def test_flags_are_booleans():
    assert all(OPTIONS[name].kind == "bool" for name in FLAGS)
    assert OPTIONS["scheduled_sampling_reflexflow"].kind == "bool"  # prose-only switch


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_choices_follow_the_reference_order(name):
    assert OPTIONS[name].choices == CHOICES[name]


def test_model_family_adds_legacy_after_the_listed_families():
    assert OPTIONS["model_family"].choices == MODEL_FAMILIES + ("legacy",)


def test_every_default_survives_its_own_parser():
    for entry in part_a_options():
        if entry.default is not None:
            assert convert(entry, entry.default, "the default") == entry.default, entry.name


@pytest.mark.parametrize("name", sorted(REFERENCE_DEFAULTS))
def test_reference_defaults(name):
    assert getattr(Settings({}), name) == REFERENCE_DEFAULTS[name]


def test_required_options():
    required = {entry.name for entry in part_a_options() if entry.required}
    assert required == {"model_family", "model_type", "output_dir", "data_backend_config", "optimizer"}


def test_validation_steps_is_an_alias():
    assert canonical_name("--validation_steps") == "validation_step_interval"
    assert Settings({"validation_steps": 10}).validation_step_interval == 10


def test_only_hardware_bound_quantisation_is_gated():
    for name in ("base_model_precision", "text_encoder_3_precision"):
        gates = OPTIONS[name].gated_choices
        assert gates == {"nf4-bnb": "bitsandbytes", "int4-torchao": "cuda", "fp8-torchao": "cuda_fp8"}
    for entry in part_a_options():
        assert set(entry.gated_choices.values()) <= set(REQUIREMENTS), entry.name


def test_list_and_json_options_stay_text():
    for name in ("peft_lora_target_modules", "validation_guidance_skip_layers", "tread_config",
                 "custom_text_encoder_intermediary_layers", "validation_resolution"):
        assert OPTIONS[name].kind == "str"
    skip_layers = OPTIONS["validation_guidance_skip_layers"]
    assert convert(skip_layers, [7, 8, 9], "config.json") == "[7, 8, 9]"


def test_singlora_is_refused_with_its_reason():
    from simpletuner.config.validate import implementation_errors

    (error,) = implementation_errors(Settings({"peft_lora_mode": "singlora"}))
    assert "not implemented yet" in str(error) and "SingLoRA" in str(error) and "PEFT" in str(error)
    assert implementation_errors(Settings({"peft_lora_mode": "standard"})) == []
