"""Part B of the option table: every listed name, its choices, a sample of defaults, aliases and gating."""

import json
from pathlib import Path

import pytest

from simpletuner.config.hardware import REQUIREMENTS
from simpletuner.config.option_groups import b1_family, b2_noise_loss, b3_optim, b4_dataset, b5_monitoring
from simpletuner.config.options import ALIASES, OPTIONS, canonical_name
from simpletuner.config.settings import Settings

PART_B_MODULES = (b1_family, b2_noise_loss, b3_optim, b4_dataset, b5_monitoring)
PART_B_LIST = Path("/work/scratch/options_part_B.json")

# Names and choices as the reference usage listing gives them (independent of the listing file).
EXPECTED_CHOICES = {
    "flux_guidance_mode": ("constant", "random-range"),
    "t5_padding": ("zero", "unmodified"),
    "mixed_precision": ("no", "fp16", "bf16", "fp8"),
    "data_backend_sampling": ("uniform", "auto-weighting"),
    "aspect_bucket_alignment": (8, 16, 24, 32, 64),
    "timestep_bias_strategy": ("earlier", "later", "range", "none"),
    "loss_type": ("l2", "huber", "smooth_l1"),
    "report_to": ("tensorboard", "wandb", "comet_ml", "all", "none"),
    "distillation_method": ("lcm", "dcm", "dmd", "perflow"),
    "ema_validation": ("none", "ema_only", "comparison"),
    "ltx_train_mode": ("t2v", "i2v"),
    "crepa_model": ("dinov2_vitg14", "dinov2_vitb14", "dinov2_vits14"),
    "disk_low_action": ("stop", "wait", "script"),
}

# Defaults the reference states outright (prose sections or help text).
EXPECTED_DEFAULTS = {
    "attention_mechanism": "diffusers",
    "data_backend_sampling": "auto-weighting",
    "dataloader_prefetch_qlen": 10,
    "aspect_bucket_worker_count": 12,
    "delete_unwanted_images": False,
    "flux_guidance_value": 1.0,
    "sd3_clip_uncond_behaviour": "empty_string",
    "hidream_load_balancing_loss_weight": 0.01,
    "validation_method": "simpletuner-local",
    "validation_preview": False,
    "validation_preview_steps": 1,
    "validation_adapter_strength": 1.0,
    "crepa_lambda": 0.5,
    "crepa_normalize_by_frames": True,
    "crepa_spatial_align": True,
    "crepa_encoder_frames_batch_size": -1,
    "crepa_encoder_image_size": 518,
    "crepa_similarity_ema_decay": 0.99,
    "crepa_similarity_threshold": None,
    "layersync_enabled": False,
    "layersync_lambda": 0.2,
    "disk_low_threshold": None,
    "disk_low_action": "stop",
    "max_upscale_threshold": None,
    "modelspec_comment": None,
}


def _part_b_entries():
    return [entry for module in PART_B_MODULES for entry in module.OPTIONS]


def _typed(kind, value):
    return {"int": int, "float": float}.get(kind, str)(value)


@pytest.mark.skipif(not PART_B_LIST.exists(), reason="part B name list not present")
def test_every_listed_name_is_defined_with_its_listed_choices():
    listed = json.loads(PART_B_LIST.read_text())
    assert len(listed) == 179
    for item in listed:
        option = OPTIONS.get(item["name"])
        assert option is not None, f"{item['name']} missing from the option table"
        if item["kind"] == "flag":
            assert option.kind == "bool", item["name"]
        if item["kind"] == "choice":
            expected = tuple(_typed(option.kind, choice) for choice in item["choices"])
            assert option.choices == expected, item["name"]
        else:
            assert option.kind != "bool" or option.choices is None, item["name"]


def test_part_b_modules_define_nothing_beyond_the_list():
    names = [entry.name for entry in _part_b_entries()]
    assert len(names) == len(set(names)) == 179


@pytest.mark.parametrize("name,choices", sorted(EXPECTED_CHOICES.items()))
def test_choices_match_reference_order(name, choices):
    assert OPTIONS[name].choices == choices


@pytest.mark.parametrize("name,default", sorted(EXPECTED_DEFAULTS.items()))
def test_defaults_match_reference(name, default):
    assert OPTIONS[name].default == default
    assert getattr(Settings({}), name) == default


def test_every_choice_default_is_one_of_its_choices():
    for entry in _part_b_entries():
        if entry.choices is not None and entry.default is not None:
            assert entry.default in entry.choices, entry.name


def test_defaults_have_the_declared_kind():
    python_types = {"bool": bool, "int": int, "float": float, "str": str}
    for entry in _part_b_entries():
        if entry.default is not None:
            assert type(entry.default) is python_types[entry.kind], entry.name


def test_all_part_b_options_have_real_help():
    for entry in _part_b_entries():
        assert len(entry.help) > 20, entry.name


def test_aliases_resolve_to_canonical_names():
    assert ALIASES["checkpointing_steps"] == "checkpoint_step_interval"
    assert canonical_name("--checkpointing_steps") == "checkpoint_step_interval"
    assert canonical_name("crepa_encoder") == "crepa_model"
    assert Settings({"checkpointing_steps": 250}).checkpoint_step_interval == 250


def test_gated_choices_use_known_requirement_keys():
    for entry in _part_b_entries():
        for choice, key in entry.gated_choices.items():
            assert key in REQUIREMENTS, f"{entry.name}={choice} names unknown requirement {key}"


def test_cpu_capable_choices_are_not_gated():
    attention = OPTIONS["attention_mechanism"].gated_choices
    for choice in ("diffusers", "native-math", "native-flash"):
        assert choice not in attention
    assert attention["flex"] == "cuda"  # no backward pass on CPU
    assert attention["flash-attn-3"] == "flash_attn_3"
    assert attention["xformers"] == "xformers"
    assert OPTIONS["mixed_precision"].gated_choices == {"fp8": "cuda_fp8"}


def test_groups_come_from_each_module():
    for module in PART_B_MODULES:
        for entry in module.OPTIONS:
            assert OPTIONS[entry.name].group == module.GROUP
