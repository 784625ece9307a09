"""validation_noise_scheduler -> the diffusers scheduler a validation pipeline samples with.

The new scheduler is made from the pipeline's own scheduler config, so the
model's betas, prediction type and timestep spacing carry over. DDPM-style
samplers only apply to families trained on a DDPM schedule; flow-matching
families sample with FlowMatchEulerDiscreteScheduler ("euler"), their default.
"""

from __future__ import annotations

# choice -> diffusers class name, for DDPM-style (epsilon / v-prediction) families
DDPM_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}
FLOW_SCHEDULERS = {"euler": "FlowMatchEulerDiscreteScheduler"}


def scheduler_problem(choice: str | None, flow_matching: bool, family_name: str) -> str | None:
    """Why ``choice`` cannot be used with this family, or None."""
    if choice is None:
        return None
    table = FLOW_SCHEDULERS if flow_matching else DDPM_SCHEDULERS
    if choice in table:
        return None
    kind = "a flow-matching" if flow_matching else "a DDPM-style"
    return (f"validation_noise_scheduler={choice} does not apply to model_family={family_name} ({kind} model); "
            f"choose one of {', '.join(table)} or leave it unset for the model's own scheduler.")


def validation_scheduler(choice: str | None, current, flow_matching: bool):
    """The scheduler for ``choice`` built from ``current``'s config, or None to keep ``current``."""
    if choice is None:
        return None
    import diffusers

    table = FLOW_SCHEDULERS if flow_matching else DDPM_SCHEDULERS
    if choice not in table:
        raise ValueError(f"validation_noise_scheduler={choice} is not available here; use one of {', '.join(table)}")
    scheduler_class = getattr(diffusers, table[choice])
    return scheduler_class.from_config(current.config)
