"""The keyword arguments a validation render passes to the family's pipeline.

Guidance features exist only in some diffusers pipelines, so support is read
from the pipeline's ``__call__`` signature: an option whose argument the
family's pipeline does not take is refused (``sampling_problems``) rather
than silently ignored.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass

from simpletuner.validation.prompts import negative_prompt


@dataclass(frozen=True)
class GuidanceFeature:
    option: str  # the validation_* option that turns it on
    inactive: object  # the option's value that leaves the feature off
    arguments: tuple[str, ...]  # pipeline arguments it needs
    example: str  # a pipeline that has it, for the error message


FEATURES = (
    GuidanceFeature("validation_guidance_rescale", 0.0, ("guidance_rescale",),
                    "the Stable Diffusion / SDXL pipelines"),
    GuidanceFeature("validation_guidance_real", 1.0, ("true_cfg_scale", "negative_prompt"),
                    "FluxPipeline (true classifier-free guidance)"),
    GuidanceFeature("validation_guidance_skip_layers", None,
                    ("skip_guidance_layers", "skip_layer_guidance_scale", "skip_layer_guidance_start",
                     "skip_layer_guidance_stop"), "StableDiffusion3Pipeline (skip-layer guidance)"),
)


def pipeline_arguments(pipeline_class) -> set[str]:
    """Names of the keyword arguments the pipeline's ``__call__`` accepts."""
    return set(inspect.signature(pipeline_class.__call__).parameters) - {"self", "kwargs"}


def _active(settings, feature: GuidanceFeature) -> bool:
    value = getattr(settings, feature.option)
    return value is not None and value != feature.inactive


def sampling_problems(settings, pipeline_class, family_name: str) -> list[tuple[str, str]]:
    """(option, message) for each option the family's pipeline cannot honour."""
    accepted = pipeline_arguments(pipeline_class)
    problems = []
    for feature in FEATURES:
        if _active(settings, feature) and not set(feature.arguments) <= accepted:
            value = getattr(settings, feature.option)
            problems.append((feature.option, f"{feature.option}={value!r} is not supported by "
                                             f"model_family={family_name} ({pipeline_class.__name__} has no "
                                             f"{feature.arguments[0]} argument; it exists in {feature.example}). "
                                             f"Remove {feature.option} from your config."))
    if _active(settings, FEATURES[1]) and not negative_prompt(settings):
        problems.append(("validation_guidance_real",
                         "validation_guidance_real needs a validation_negative_prompt (true classifier-free guidance "
                         "steers away from it); set one or leave validation_guidance_real at 1.0."))
    if settings.validation_guidance_skip_layers is not None:
        try:
            skip_layers(settings)
        except ValueError as exc:
            problems.append(("validation_guidance_skip_layers", str(exc)))
    return problems


def skip_layers(settings) -> list[int]:
    """validation_guidance_skip_layers as a list of block indices."""
    raw = settings.validation_guidance_skip_layers
    try:
        layers = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        layers = None
    if not isinstance(layers, list) or not all(isinstance(i, int) and i >= 0 for i in layers):
        raise ValueError(f"validation_guidance_skip_layers={raw!r} must be a JSON list of block indices, "
                         "e.g. [7, 8, 9].")
    return layers


def call_arguments(settings, pipeline_class) -> dict:
    """Arguments shared by every render of a round (not prompt, size or generator)."""
    accepted = pipeline_arguments(pipeline_class)
    arguments: dict = {"num_inference_steps": int(settings.validation_num_inference_steps)}
    if "guidance_scale" in accepted:
        arguments["guidance_scale"] = float(settings.validation_guidance)
    negative = negative_prompt(settings)
    if negative and "negative_prompt" in accepted:
        arguments["negative_prompt"] = negative
    if _active(settings, FEATURES[0]):
        arguments["guidance_rescale"] = float(settings.validation_guidance_rescale)
    if _active(settings, FEATURES[1]):
        arguments["true_cfg_scale"] = float(settings.validation_guidance_real)
    if _active(settings, FEATURES[2]):
        arguments.update(skip_guidance_layers=skip_layers(settings),
                         skip_layer_guidance_scale=float(settings.validation_guidance_skip_scale),
                         skip_layer_guidance_start=float(settings.validation_guidance_skip_layers_start),
                         skip_layer_guidance_stop=float(settings.validation_guidance_skip_layers_stop))
    return arguments
