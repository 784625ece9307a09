"""validation_no_cfg_until_timestep on the tiny Flux (true CFG), and its refusal where a family has no true CFG."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch

from simpletuner.config.settings import Settings
from simpletuner.validation.checks import validation_errors

STEPS = 3


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from simpletuner.models.registry import get_family
    from simpletuner.models.tiny import build_tiny

    model_dir = build_tiny("flux", str(tmp_path_factory.mktemp("models") / "flux"))
    settings = Settings({"model_family": "flux", "pretrained_model_name_or_path": model_dir})
    family = get_family("flux", settings)(settings)
    components = family.load(torch.device("cpu"), torch.float32)
    components.vae.to(torch.float32)
    return family


def render(family, **options) -> tuple[np.ndarray, int]:
    """A 64px render and how many times the transformer really ran."""
    from simpletuner.validation.images import RenderKey
    from simpletuner.validation.prompts import ValidationPrompt
    from simpletuner.validation.renderer import Renderer

    settings = Settings({"validation_num_inference_steps": STEPS, "validation_guidance": 3.5,
                         "validation_negative_prompt": "a blurry photo", **options})
    transformer = family.components.denoiser
    runs = []
    hook = transformer.x_embedder.register_forward_hook(lambda *_: runs.append(1))
    try:
        renderer = Renderer(family, transformer, settings, torch.device("cpu"), 11, nullcontext)
        image = renderer.render(ValidationPrompt("validation", "a blue square"), RenderKey("validation", 64, 64, 0))
    finally:
        hook.remove()
    return np.asarray(image, dtype=np.int16), len(runs)


def test_skipping_cfg_for_every_step_equals_no_true_cfg(flux):
    unguided, unguided_runs = render(flux, validation_guidance_real=1.0)
    skipped, skipped_runs = render(flux, validation_guidance_real=4.0, validation_no_cfg_until_timestep=STEPS)
    guided, guided_runs = render(flux, validation_guidance_real=4.0, validation_no_cfg_until_timestep=0)
    partly, partly_runs = render(flux, validation_guidance_real=4.0, validation_no_cfg_until_timestep=1)
    assert np.array_equal(skipped, unguided)
    assert (unguided_runs, skipped_runs, guided_runs, partly_runs) == (STEPS, STEPS, 2 * STEPS, 2 * STEPS - 1)
    assert np.abs(guided - unguided).max() > 0
    assert np.abs(partly - guided).max() > 0 and np.abs(partly - unguided).max() > 0
    assert "forward" not in vars(flux.components.denoiser)  # the transformer is left as it was


def test_no_cfg_until_timestep_is_refused_without_true_cfg():
    sdxl = Settings({"model_family": "sdxl", "validation_prompt": "a cat", "validation_no_cfg_until_timestep": 3})
    errors = validation_errors(sdxl)
    assert [error.key for error in errors] == ["validation_no_cfg_until_timestep"]
    assert "StableDiffusionXLPipeline" in str(errors[0])
    assert validation_errors(Settings({"model_family": "sdxl", "validation_prompt": "a cat"})) == []
    negative = validation_errors(Settings({"model_family": "flux", "validation_prompt": "a cat",
                                           "validation_no_cfg_until_timestep": -1}))
    assert [error.key for error in negative] == ["validation_no_cfg_until_timestep"]
