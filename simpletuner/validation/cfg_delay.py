"""validation_no_cfg_until_timestep: no true classifier-free guidance for the first N sampling steps.

Pipelines with true CFG (``true_cfg_scale``, e.g. FluxPipeline) call the
denoiser twice per step, the prompt first and the negative prompt second, and
mix the two. During the first N steps the second call is answered with the
first call's output instead of running the model, so the mix reduces to the
plain prompt prediction (no guidance, and no extra compute). The step count
comes from the pipeline's ``callback_on_step_end``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from simpletuner.validation.sampling import FEATURES, pipeline_arguments

OPTION = "validation_no_cfg_until_timestep"
NEEDED_ARGUMENTS = ("true_cfg_scale", "callback_on_step_end")


def delay_problem(settings, pipeline_class, family_name: str) -> str | None:
    """Why an explicitly set validation_no_cfg_until_timestep cannot be honoured, or None."""
    if not settings.is_set(OPTION):
        return None
    value = settings.validation_no_cfg_until_timestep
    if value is None or int(value) < 0:
        return f"{OPTION}={value!r} must be a whole number of sampling steps, 0 or more."
    if not set(NEEDED_ARGUMENTS) <= pipeline_arguments(pipeline_class):
        return (f"{OPTION} applies to pipelines with true classifier-free guidance (validation_guidance_real), "
                f"which model_family={family_name} ({pipeline_class.__name__}) does not have. Remove {OPTION}.")
    return None


def delayed_steps(settings, pipeline_class) -> int:
    """How many first steps skip true CFG in renders with this pipeline (0: none)."""
    real = FEATURES[1]
    value = getattr(settings, real.option)
    guided = value is not None and value != real.inactive
    if not guided or not set(NEEDED_ARGUMENTS) <= pipeline_arguments(pipeline_class):
        return 0
    return max(0, int(settings.validation_no_cfg_until_timestep or 0))


class DelayedTrueCfg:
    def __init__(self, steps: int):
        self.steps = steps
        self.step = 0
        self.calls = 0
        self.conditional = None

    def step_done(self, pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        """The pipeline's callback_on_step_end: the next denoiser call starts step ``step + 1``."""
        self.step, self.calls = step + 1, 0
        return {}

    @contextmanager
    def installed(self, denoiser) -> Iterator[None]:
        """Answer the negative-prompt call of early steps with the prompt call's output (one render)."""
        own = vars(denoiser).get("forward")
        original = denoiser.forward
        self.step, self.calls, self.conditional = 0, 0, None

        def forward(*args, **kwargs):
            self.calls += 1
            if self.calls == 2 and self.step < self.steps:
                return self.conditional
            output = original(*args, **kwargs)
            self.conditional = output if self.calls == 1 else None
            return output

        denoiser.forward = forward
        try:
            yield
        finally:
            self.conditional = None
            if own is None:
                del denoiser.forward
            else:
                denoiser.forward = own
