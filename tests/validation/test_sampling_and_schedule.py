"""Pipeline arguments per family, sampler choice, config checks, and when rounds are due."""

from __future__ import annotations

import pytest

from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.validation.checks import validation_errors
from simpletuner.validation.sampling import call_arguments, sampling_problems
from simpletuner.validation.schedule import Schedule
from simpletuner.validation.schedulers import scheduler_problem, validation_scheduler


class SkipLayerPipeline:
    """Stands in for a pipeline class with SD3-style skip-layer guidance."""

    def __call__(self, prompt=None, negative_prompt=None, guidance_scale=7.0, num_inference_steps=28,
                 skip_guidance_layers=None, skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.01,
                 skip_layer_guidance_stop=0.2, **kwargs):
        raise NotImplementedError


def sdxl_pipeline():
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline


def test_sdxl_call_arguments():
    settings = Settings({"validation_guidance": 5.0, "validation_guidance_rescale": 0.7,
                         "validation_num_inference_steps": 12})
    assert sampling_problems(settings, sdxl_pipeline(), "sdxl") == []
    assert call_arguments(settings, sdxl_pipeline()) == {
        "num_inference_steps": 12, "guidance_scale": 5.0, "negative_prompt": "blurry, cropped, ugly",
        "guidance_rescale": 0.7}


def test_sdxl_refuses_true_cfg_and_skip_layers():
    settings = Settings({"validation_guidance_real": 3.0, "validation_guidance_skip_layers": "[7, 8]"})
    problems = dict(sampling_problems(settings, sdxl_pipeline(), "sdxl"))
    assert set(problems) == {"validation_guidance_real", "validation_guidance_skip_layers"}
    assert "StableDiffusionXLPipeline has no true_cfg_scale argument" in problems["validation_guidance_real"]


def test_skip_layer_guidance_reaches_a_pipeline_that_has_it():
    settings = Settings({"validation_guidance_skip_layers": "[7, 8, 9]", "validation_guidance_skip_scale": 3.5,
                         "validation_guidance_skip_layers_start": 0.1, "validation_guidance_skip_layers_stop": 0.4})
    assert sampling_problems(settings, SkipLayerPipeline, "sd3") == []
    arguments = call_arguments(settings, SkipLayerPipeline)
    assert arguments["skip_guidance_layers"] == [7, 8, 9]
    assert (arguments["skip_layer_guidance_scale"], arguments["skip_layer_guidance_start"],
            arguments["skip_layer_guidance_stop"]) == (3.5, 0.1, 0.4)


def test_malformed_skip_layers_are_reported():
    problems = dict(sampling_problems(Settings({"validation_guidance_skip_layers": "7,8"}), SkipLayerPipeline, "sd3"))
    assert "must be a JSON list of block indices" in problems["validation_guidance_skip_layers"]


def test_schedulers_for_ddpm_and_flow_families():
    from diffusers import DDIMScheduler, DDPMScheduler, UniPCMultistepScheduler

    base = DDPMScheduler(prediction_type="v_prediction", timestep_spacing="trailing")
    chosen = validation_scheduler("unipc", base, flow_matching=False)
    assert isinstance(chosen, UniPCMultistepScheduler) and chosen.config.prediction_type == "v_prediction"
    assert isinstance(validation_scheduler("ddim", base, flow_matching=False), DDIMScheduler)
    assert validation_scheduler(None, base, flow_matching=False) is None
    assert scheduler_problem("euler", True, "flux") is None
    assert "flow-matching" in scheduler_problem("dpm++", True, "flux")
    assert "choose one of" in scheduler_problem("perflow", False, "sdxl")


def test_config_checks_for_sdxl():
    assert validation_errors(Settings({"model_family": "sdxl", "validation_prompt": "x"})) == []
    errors = validation_errors(Settings({"model_family": "sdxl", "validation_prompt": "x",
                                         "validation_resolution": "100", "validation_guidance_real": 2.0}))
    assert sorted(error.key for error in errors) == ["validation_guidance_real", "validation_resolution"]


def test_clip_needs_prompts_and_renders():
    keys = [e.key for e in validation_errors(Settings({"evaluation_type": "clip"}))]
    assert keys == ["evaluation_type"]
    errors = validation_errors(Settings({"evaluation_type": "clip", "validation_prompt": "x",
                                         "validation_disable": True}))
    assert "validation_disable is on" in str(errors[0])


def test_validation_schedule_by_steps_and_epochs():
    schedule = Schedule(Settings({"validation_step_interval": 3, "validation_epoch_interval": 2}))
    assert [s for s in range(1, 10) if schedule.validation_at_step(s)] == [3, 6, 9]
    assert [e for e in range(1, 6) if schedule.validation_at_epoch_end(e)] == [2, 4]
    assert schedule.eval_follows_validation


def test_fractional_eval_epochs():
    schedule = Schedule(Settings({"eval_epoch_interval": 0.5}))
    assert not schedule.eval_follows_validation
    assert [s for s in range(1, 13) if schedule.eval_at_step(s, steps_per_epoch=4)] == [2, 4, 6, 8, 10, 12]
    odd = Schedule(Settings({"eval_epoch_interval": 0.5}))
    assert [s for s in range(1, 11) if odd.eval_at_step(s, steps_per_epoch=5)] == [3, 5, 8, 10]


def test_eval_steps_and_epochs_both_apply():
    schedule = Schedule(Settings({"eval_steps_interval": 3, "eval_epoch_interval": 2}))
    assert [s for s in range(1, 10) if schedule.eval_at_step(s, steps_per_epoch=2)] == [3, 4, 6, 8, 9]


def test_non_positive_eval_epoch_interval_is_refused():
    with pytest.raises(ConfigError, match="must be above 0"):
        Schedule(Settings({"eval_epoch_interval": -1.0}))
