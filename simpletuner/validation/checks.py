"""Validation settings a run cannot honour, found before any image is rendered.

``validation_errors`` needs no loaded model (only the family class), so it can
run with the other config checks; the validation callback runs it too and
stops the run on the first problems.
"""

from __future__ import annotations

from simpletuner.config.errors import ConfigError
from simpletuner.validation.prompts import load_prompts
from simpletuner.validation.resolutions import parse_resolutions
from simpletuner.validation.sampling import sampling_problems
from simpletuner.validation.schedulers import scheduler_problem


def validation_errors(settings) -> list[ConfigError]:
    errors: list[ConfigError] = []
    try:
        prompts = load_prompts(settings)
    except ConfigError as error:
        errors.append(error)
        prompts = []
    if settings.evaluation_type == "clip":
        errors.extend(_clip_errors(settings, prompts))
    if settings.validation_disable or not prompts:
        return errors
    try:
        parse_resolutions(settings.validation_resolution)
    except ConfigError as error:
        errors.append(error)
    errors.extend(_family_errors(settings))
    return errors


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
    errors.extend(ConfigError(option, message)
                  for option, message in sampling_problems(settings, family.pipeline_class, family.name))
    return errors
