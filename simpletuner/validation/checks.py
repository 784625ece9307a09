"""Validation settings a run cannot honour, found before any image is rendered.

``validation_errors`` needs no loaded model (only the family class), so it can
run with the other config checks; the validation callback runs it too and
stops the run on the first problems.
"""

from __future__ import annotations

import inspect
import math

from simpletuner.config.errors import ConfigError
from simpletuner.validation.adapter_specs import adapter_runs
from simpletuner.validation.cfg_delay import delay_problem
from simpletuner.validation.prompts import load_prompts
from simpletuner.validation.resolutions import parse_resolutions
from simpletuner.validation.sampling import sampling_problems
from simpletuner.validation.schedulers import scheduler_problem

EXTERNAL_METHOD = "external-script"


def validation_errors(settings) -> list[ConfigError]:
    if settings.validation_method == EXTERNAL_METHOD:
        from simpletuner.validation.external import external_script_errors

        return external_script_errors(settings)
    errors: list[ConfigError] = []
    try:
        prompts = load_prompts(settings)
    except ConfigError as error:
        errors.append(error)
        prompts = []
    if settings.evaluation_type == "clip":
        errors.extend(_clip_errors(settings, prompts))
    errors.extend(_lycoris_strength_errors(settings))
    if settings.validation_disable or not (prompts or settings.validation_using_datasets):
        return errors
    try:
        parse_resolutions(settings.validation_resolution)
    except ConfigError as error:
        errors.append(error)
    errors.extend(_family_errors(settings))
    return errors


def _lycoris_strength_errors(settings) -> list[ConfigError]:
    strength = settings.validation_lycoris_strength
    if not settings.is_set("validation_lycoris_strength") or strength == 1.0:
        return []
    if settings.model_type == "lora" and settings.lora_type == "lycoris":
        return []
    return [ConfigError("validation_lycoris_strength", f"validation_lycoris_strength={strength} scales a LyCORIS "
                                                       "network, but this run trains none (it needs model_type=lora "
                                                       "and lora_type=lycoris). Remove the option.")]


def _clip_errors(settings, prompts) -> list[ConfigError]:
    if settings.validation_disable:
        return [ConfigError("evaluation_type", "evaluation_type=clip scores rendered validation images, but "
                                               "validation_disable is on; turn one of them off.")]
    if not any(not prompt.is_unconditional for prompt in prompts):
        return [ConfigError("evaluation_type", "evaluation_type=clip scores images against their prompts, but no "
                                               "validation prompt is configured; set validation_prompt, "
                                               "user_prompt_library or validation_prompt_library.")]
    return []


def _family_errors(settings) -> list[ConfigError]:
    if not settings.model_family:
        return []
    from simpletuner.models.registry import get_family

    family = get_family(settings.model_family, settings)
    errors = []
    problem = scheduler_problem(settings.validation_noise_scheduler, bool(family.flow_matching), family.name)
    if problem:
        errors.append(ConfigError("validation_noise_scheduler", problem))
    pipeline_class = _render_pipeline_class(settings, family)
    errors.extend(ConfigError(option, message)
                  for option, message in sampling_problems(settings, pipeline_class, family.name))
    delay = delay_problem(settings, pipeline_class, family.name)
    if delay:
        errors.append(ConfigError("validation_no_cfg_until_timestep", delay))
    errors.extend(_adapter_errors(settings, family))
    if settings.validation_using_datasets:
        errors.extend(_img2img_errors(settings, family))
    return errors


def _render_pipeline_class(settings, family):
    """The pipeline renders use; the family's own when its ControlNet settings are refused elsewhere."""
    from simpletuner.validation.control import render_pipeline_class

    try:
        return render_pipeline_class(settings, family)
    except ConfigError:  # no ControlNet for this family: controlnet_problems reports it
        return family.pipeline_class


def _adapter_errors(settings, family) -> list[ConfigError]:
    try:
        runs = adapter_runs(settings)
    except ConfigError as error:
        return [error]
    if all(run.is_base for run in runs) or hasattr(family.pipeline_class, "load_lora_weights"):
        return []
    option = "validation_adapter_config" if settings.validation_adapter_config else "validation_adapter_path"
    return [ConfigError(option, f"{option}: {family.pipeline_class.__name__} cannot load LoRA weights, so "
                                f"model_family={family.name} has no validation adapters. Remove {option}.")]


def _img2img_errors(settings, family) -> list[ConfigError]:
    """validation_using_datasets needs an img2img pipeline, and enough steps to denoise at its strength."""
    pipeline_class = family.img2img_pipeline_class
    if pipeline_class is None:
        return [ConfigError("validation_using_datasets", f"validation_using_datasets renders image-to-image, but "
                                                         f"model_family={family.name} has no img2img pipeline. Turn "
                                                         "validation_using_datasets off.")]
    strength = inspect.signature(pipeline_class.__call__).parameters.get("strength")
    steps = int(settings.validation_num_inference_steps)
    if strength is None or int(steps * strength.default) >= 1:
        return []
    needed = math.ceil(1 / strength.default)
    return [ConfigError("validation_num_inference_steps", f"validation_num_inference_steps={steps} leaves no "
                                                          f"denoising step for {pipeline_class.__name__}, which "
                                                          f"denoises {strength.default:g} of the schedule from the "
                                                          f"input image; use at least {needed}.")]
