"""Cross-option rules, checked before any model is loaded.

``validate_settings`` returns a list of ConfigError; the CLI prints them and
exits with status 2. Nothing here changes the settings.
"""

from __future__ import annotations

from typing import Callable

from simpletuner.config import hardware
from simpletuner.config.errors import ConfigError
from simpletuner.config.option_types import PLANNED
from simpletuner.config.settings import Settings
from simpletuner.config.values import describe_kind

# (option a, option b, sentence): both set (truthy) is an error.
MUTUALLY_EXCLUSIVE = [
    ("enable_group_offload", "enable_model_cpu_offload", "pick one offloading strategy per run"),
    ("ramtorch", "enable_group_offload", "RamTorch and group offload both move weights; use one"),
    ("fully_unload_text_encoder", "train_text_encoder", "the text encoders being trained cannot leave memory"),
    ("validation_adapter_path", "validation_adapter_config", "give one adapter path or an adapter config file, not both"),
    ("controlnet", "control", "a run trains either a ControlNet beside the model or the model's own widened input "
                              "layer (channel control), not both"),
]

# (option, required option, sentence): option set without the other is an error.
REQUIRES = [
    ("diff2flow_loss", "diff2flow_enabled", "the diff2flow loss only exists when diff2flow is enabled"),
]


def _is_active(settings: Settings, name: str) -> bool:
    value = getattr(settings, name)
    return value not in (None, False, "", 0, "none")


def required_errors(settings: Settings) -> list[ConfigError]:
    from simpletuner.config.options import OPTIONS

    errors = []
    for name, option in OPTIONS.items():
        if option.required and getattr(settings, name) in (None, ""):
            allowed = f" ({describe_kind(option)})" if option.choices else ""
            errors.append(ConfigError(name, f"{name} is required but was not set{allowed}. Add \"{name}\" to your "
                                            f"config.json or pass --{name}=... on the command line."))
    return errors


def implementation_errors(settings: Settings) -> list[ConfigError]:
    """Options (or choices) that parse but whose behaviour is not built yet, and hardware-gated choices."""
    from simpletuner.config.options import OPTIONS

    errors = []
    for name, value in settings.explicit().items():
        option = OPTIONS[name]
        needs = hardware.unmet(option.requires) if option.requires and value != option.default else None
        if needs:
            errors.append(ConfigError(name, f"{name} needs {needs}, which this machine does not have. "
                                            f"Remove it from your config or run on hardware that provides it."))
            continue
        if option.status == PLANNED and value != option.default:
            errors.append(ConfigError(name, f"{name} is not implemented yet (you set it to {value!r}). "
                                            f"{_unbuilt_reason(option)}Remove it from your config to train with "
                                            f"the default ({option.default!r})."))
            continue
        requirement = option.gated_choices.get(value)
        needs = hardware.unmet(requirement) if requirement is not None else None
        if value in option.planned_choices:
            others = ", ".join(str(c) for c in option.choices if c not in option.planned_choices)
            hardware_note = f"It also needs {needs}, which this machine does not have. " if needs else ""
            errors.append(ConfigError(name, f"{name}={value} is not implemented yet. {_unbuilt_reason(option)}"
                                            f"{hardware_note}Choose another value ({others})."))
            continue
        if needs:
            errors.append(ConfigError(name, f"{name}={value} needs {needs}, which this machine does not have. "
                                            "Choose another value or run on hardware that provides it."))
    return errors


def _unbuilt_reason(option) -> str:
    return f"{option.unbuilt_reason} " if option.unbuilt_reason else ""


def combination_errors(settings: Settings) -> list[ConfigError]:
    errors = []
    for first, second, why in MUTUALLY_EXCLUSIVE:
        if _is_active(settings, first) and _is_active(settings, second):
            errors.append(ConfigError(first, f"{first} and {second} cannot be used together: {why}. Remove one of them."))
    for option, needed, why in REQUIRES:
        if _is_active(settings, option) and not _is_active(settings, needed):
            errors.append(ConfigError(option, f"{option} is set but {needed} is not: {why}. Set {needed}=true or remove {option}."))
    if settings.optimizer_release_gradients and settings.is_set("max_grad_norm") and settings.max_grad_norm:
        errors.append(ConfigError("optimizer_release_gradients", "optimizer_release_gradients frees each gradient as "
                                  "soon as it is applied, so max_grad_norm clipping cannot happen. Remove max_grad_norm "
                                  "or turn optimizer_release_gradients off."))
    if settings.max_train_steps in (None, 0) and settings.num_train_epochs in (None, 0):
        errors.append(ConfigError("max_train_steps", "Neither max_train_steps nor num_train_epochs is set, so training "
                                                     "would never end. Set one of them to a positive number."))
    return errors


def family_errors(settings: Settings) -> list[ConfigError]:
    """The chosen family's own checks (flavour, prediction type, ...)."""
    if not settings.model_family:
        return []
    from simpletuner.models.registry import get_family

    try:
        family = get_family(settings.model_family, settings)
    except (KeyError, NotImplementedError) as exc:
        return [ConfigError("model_family", str(exc.args[0] if exc.args else exc))]
    errors = [ConfigError("model_family", message) for message in family.check_settings(settings)]
    other = "transformer" if family.denoiser_subfolder == "unet" else "unet"
    for suffix in ("model_name_or_path", "subfolder"):
        name = f"pretrained_{other}_{suffix}"
        if settings.is_set(name) and getattr(settings, name) not in (None, "", other):
            errors.append(ConfigError(name, f"{name} does not apply to model_family={settings.model_family}, whose "
                                            f"trained model is a {family.denoiser_subfolder}; use "
                                            f"pretrained_{family.denoiser_subfolder}_{suffix} instead."))
    return errors


def adapter_errors(settings: Settings) -> list[ConfigError]:
    """A LyCORIS run's config file is read now, so a bad file fails before any caching."""
    if settings.model_type != "lora" or settings.lora_type != "lycoris":
        return []
    if not settings.lycoris_config:
        return [ConfigError("lycoris_config", "lora_type=lycoris needs lycoris_config: the path of a JSON file "
                                              "describing the network (algo, factor, apply_preset ...).")]
    from simpletuner.training.lycoris_adapter import load_lycoris_config

    try:
        load_lycoris_config(settings.lycoris_config)
    except ConfigError as exc:
        return [exc]
    return []


def integration_errors(settings: Settings) -> list[ConfigError]:
    """Trackers, webhooks, disk guard and user scripts: missing packages, bad files, bad thresholds."""
    from simpletuner.integrations.checks import integration_errors as check

    return check(settings)


def controlnet_errors(settings: Settings) -> list[ConfigError]:
    """ControlNet and channel-control options that cannot work together or with the chosen family; masked-loss
    probability range."""
    from simpletuner.models.controlnets import controlnet_problems
    from simpletuner.training.channel_control import channel_control_problems

    return controlnet_problems(settings) + channel_control_problems(settings)


def quantization_errors(settings: Settings) -> list[ConfigError]:
    """Precision levels, quantization_config and .gguf files the chosen family cannot load or train."""
    if not settings.model_family:
        return []
    from simpletuner.models.registry import get_family
    from simpletuner.training.quantization_checks import quantization_problems

    try:
        family = get_family(settings.model_family, settings)
    except (KeyError, NotImplementedError):
        return []  # family_errors reports it
    return quantization_problems(settings, family)


def validation_errors(settings: Settings) -> list[ConfigError]:
    """Validation prompts, resolutions, samplers and eval datasets that cannot work."""
    from simpletuner.validation.checks import validation_errors as check

    return check(settings)


def engine_errors(settings: Settings) -> list[ConfigError]:
    """Text-encoder training and layer freezing that cannot work."""
    from simpletuner.training.engine_checks import engine_errors as check

    return check(settings)


CHECKS: list[Callable[[Settings], list[ConfigError]]] = [
    required_errors,
    implementation_errors,
    combination_errors,
    adapter_errors,
    family_errors,
    controlnet_errors,
    quantization_errors,
    integration_errors,
    validation_errors,
    engine_errors,
]


def validate_settings(settings: Settings) -> list[ConfigError]:
    errors: list[ConfigError] = []
    for check in CHECKS:
        errors.extend(check(settings))
    return errors
