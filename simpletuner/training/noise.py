"""Noise and timestep sampling for one training step.

DDPM-style families draw integer timesteps and noise latents through their
training scheduler. Flow-matching families draw a sigma in (0, 1) per sample
and mix data and noise linearly: ``x_s = (1 - s) * x + s * noise``.

Every random draw takes an optional ``torch.Generator`` so a seeded run repeats
exactly. Draws happen on the generator's device (CPU generators are the norm)
and are then moved to the device the caller asks for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from simpletuner.config.settings import Settings

BIAS_STRATEGIES = ("none", "earlier", "later", "range")

# Sigmas a four-step few-step sampler (Flux schnell style: linspace(1, 1/4, 4), no shift)
# evaluates; flux_fast_schedule trains only on these.
FAST_SCHEDULE_SIGMAS = (1.0, 0.75, 0.5, 0.25)

# Flow sigmas are kept inside [SIGMA_EPS, 1 - SIGMA_EPS] so they are never exactly 0 or 1.
SIGMA_EPS = 1e-5

# Timestep grid used when timestep_bias_strategy shapes flow-matching sigmas.
FLOW_BIAS_TIMESTEPS = 1000


# --- random draws that honour a generator on any device ---------------------------------
def _draw_device(generator: torch.Generator | None, device) -> torch.device:
    return generator.device if generator is not None else torch.device(device)


def _randn(shape, generator, device) -> torch.Tensor:
    values = torch.randn(tuple(shape), generator=generator, device=_draw_device(generator, device))
    return values.to(device)


def _rand(shape, generator, device) -> torch.Tensor:
    values = torch.rand(tuple(shape), generator=generator, device=_draw_device(generator, device))
    return values.to(device)


# --- DDPM timesteps -------------------------------------------------------------------------
def timestep_weights(num_train_timesteps: int, settings: Settings) -> torch.Tensor:
    """Relative sampling weight of each timestep (float32, length num_train_timesteps, sums to 1).

    ``earlier``/``later`` multiply the first/last ``timestep_bias_portion`` of the
    schedule by ``timestep_bias_multiplier``; ``range`` multiplies timesteps
    ``timestep_bias_begin`` (inclusive) to ``timestep_bias_end`` (exclusive).
    """
    strategy = settings.timestep_bias_strategy or "none"
    if strategy not in BIAS_STRATEGIES:
        raise ValueError(f"timestep_bias_strategy={strategy!r} is not one of {BIAS_STRATEGIES}.")
    weights = torch.ones(num_train_timesteps, dtype=torch.float32)
    if strategy == "none":
        return weights / num_train_timesteps
    multiplier = float(settings.timestep_bias_multiplier)
    if multiplier <= 0:
        raise ValueError(
            f"timestep_bias_multiplier={multiplier} must be above 0; to switch biasing off set "
            "timestep_bias_strategy to none instead."
        )
    weights[_biased_slice(strategy, num_train_timesteps, settings)] *= multiplier
    return weights / weights.sum()


def _biased_slice(strategy: str, num_train_timesteps: int, settings: Settings) -> slice:
    if strategy == "range":
        begin, end = int(settings.timestep_bias_begin), int(settings.timestep_bias_end)
        if not 0 <= begin < end <= num_train_timesteps:
            raise ValueError(
                f"timestep_bias_begin={begin} and timestep_bias_end={end} must satisfy "
                f"0 <= begin < end <= {num_train_timesteps} (the scheduler's num_train_timesteps)."
            )
        return slice(begin, end)
    portion = float(settings.timestep_bias_portion)
    count = int(portion * num_train_timesteps)
    if not 0 < portion <= 1 or count == 0:
        raise ValueError(
            f"timestep_bias_portion={portion} must be in (0, 1] and cover at least one of the "
            f"{num_train_timesteps} timesteps."
        )
    return slice(num_train_timesteps - count, None) if strategy == "later" else slice(0, count)


def _draw_categorical(weights: torch.Tensor, batch_size: int, stratified: bool,
                      generator: torch.Generator | None) -> torch.Tensor:
    """Indices drawn from ``weights``; stratified draws one per equal-probability segment.

    Stratifying spreads each batch across the whole (weighted) distribution while
    keeping every single draw distributed exactly as ``weights``; the order is
    shuffled so batch position says nothing about the timestep.
    """
    draw_device = weights.device
    if not stratified:
        return torch.multinomial(weights, batch_size, replacement=True, generator=generator)
    cdf = torch.cumsum(weights.double(), 0)
    cdf = cdf / cdf[-1]
    offsets = torch.rand(batch_size, generator=generator, device=draw_device, dtype=torch.float64)
    points = (torch.arange(batch_size, device=draw_device, dtype=torch.float64) + offsets) / batch_size
    indices = torch.searchsorted(cdf, points, right=True).clamp_(max=weights.numel() - 1)
    order = torch.randperm(batch_size, generator=generator, device=draw_device)
    return indices[order]


def sample_timesteps(batch_size: int, num_train_timesteps: int, settings: Settings,
                     generator: torch.Generator | None = None, device="cpu", step: int = 0) -> torch.Tensor:
    """One integer timestep per sample (LongTensor on ``device``).

    Uniform unless ``timestep_bias_strategy`` weights part of the schedule. Unless
    ``disable_segmented_timestep_sampling`` is set, a batch is stratified: one
    draw per equal-probability segment of the distribution.
    ``step`` (the optimizer step) is accepted for a uniform call signature; no
    current strategy changes with it.
    """
    weights = timestep_weights(num_train_timesteps, settings).to(_draw_device(generator, device))
    stratified = batch_size > 1 and not settings.disable_segmented_timestep_sampling
    timesteps = _draw_categorical(weights, batch_size, stratified, generator)
    return timesteps.to(device=device, dtype=torch.long)


# --- noise -----------------------------------------------------------------------------------
def make_noise(latents: torch.Tensor, settings: Settings, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise shaped like ``latents``, plus the offset-noise term when ``offset_noise`` is on.

    The offset is one constant per sample and channel, ``noise_offset * N(0, 1)``
    of shape (B, C, 1, 1[, ...]), added to each sample with probability
    ``noise_offset_probability`` (decided per sample).
    """
    noise = _randn(latents.shape, generator, latents.device)
    strength = float(settings.noise_offset or 0.0)
    if settings.offset_noise and strength > 0:
        probability = float(settings.noise_offset_probability)
        if not 0 <= probability <= 1:
            raise ValueError(f"noise_offset_probability={probability} must be between 0 and 1.")
        batch, channels = latents.shape[:2]
        spatial_ones = (1,) * (latents.ndim - 2)
        offset = _randn((batch, channels, *spatial_ones), generator, latents.device)
        applies = _rand((batch, 1, *spatial_ones), generator, latents.device) < probability
        noise = noise + strength * offset * applies
    return noise.to(latents.dtype)


def perturb_noise(noise: torch.Tensor, settings: Settings, step: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The noise to put into the model's input when ``input_perturbation`` is on.

    Returns ``noise + strength * N(0, 1)``; the caller keeps the unperturbed noise
    for the training target. With ``input_perturbation_steps`` > 0 the strength
    fades linearly to zero over that many steps and is off from then on.
    """
    strength = float(settings.input_perturbation or 0.0)
    if strength <= 0:
        return noise
    fade_steps = int(settings.input_perturbation_steps or 0)
    if fade_steps > 0:
        if step >= fade_steps:
            return noise
        strength *= 1.0 - step / fade_steps
    extra = _randn(noise.shape, generator, noise.device).to(noise.dtype)
    return noise + strength * extra


def add_noise(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The forward diffusion step through a DDPM-style scheduler (``scheduler.add_noise``)."""
    return scheduler.add_noise(latents, noise, timesteps)


# --- flow matching ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AutoShift:
    """Resolution-dependent shift: mu goes linearly from base_shift at base_seq_len to
    max_shift at max_seq_len (and beyond, linearly), and shift = exp(mu).

    The defaults are Flux's; ``from_scheduler_config`` reads a family's own values.
    """

    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    @classmethod
    def from_scheduler_config(cls, config) -> "AutoShift":
        defaults = cls()
        return cls(
            base_seq_len=int(getattr(config, "base_image_seq_len", None) or defaults.base_seq_len),
            max_seq_len=int(getattr(config, "max_image_seq_len", None) or defaults.max_seq_len),
            base_shift=float(getattr(config, "base_shift", None) or defaults.base_shift),
            max_shift=float(getattr(config, "max_shift", None) or defaults.max_shift),
        )

    def shift_for(self, image_seq_len: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        mu = self.base_shift + slope * (image_seq_len - self.base_seq_len)
        return math.exp(mu)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Move sigmas towards the noisy end for shift > 1: ``shift*s / (1 + (shift-1)*s)``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_shift(settings: Settings, image_seq_len: int | None = None, auto_shift: AutoShift | None = None) -> float:
    """The shift applied to flow sigmas.

    Resolution-based when flow_schedule_auto_shift is on (flow_schedule_shift is
    then ignored); otherwise flow_schedule_shift, where 0 (or unset) means no shift.
    """
    if settings.flow_schedule_auto_shift:
        if image_seq_len is None:
            raise ValueError("flow_schedule_auto_shift needs the image sequence length of the batch; "
                             "the caller must pass image_seq_len.")
        return (auto_shift or AutoShift()).shift_for(int(image_seq_len))
    shift = float(settings.flow_schedule_shift or 0.0)
    if shift < 0:
        raise ValueError(f"flow_schedule_shift={shift} must not be negative (0 or 1 mean no shift).")
    return shift if shift > 0 else 1.0


def _flow_distribution(settings: Settings) -> str:
    chosen = [name for name, enabled in (
        ("flux_fast_schedule", settings.flux_fast_schedule),
        ("flow_use_uniform_schedule", settings.flow_use_uniform_schedule),
        ("flow_use_beta_schedule", settings.flow_use_beta_schedule),
        ("timestep_bias_strategy", (settings.timestep_bias_strategy or "none") != "none"),
    ) if enabled]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)} each choose how flow sigmas are drawn; keep only one of them.")
    return chosen[0] if chosen else "sigmoid"


def _beta_draws(batch_size: int, alpha: float, beta: float, generator: torch.Generator | None) -> torch.Tensor:
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"flow_beta_schedule_alpha={alpha} and flow_beta_schedule_beta={beta} must both be above 0.")
    # torch's Beta sampler takes no generator; seed numpy from the generator so runs repeat.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=_draw_device(generator, "cpu")).item())
    values = np.random.default_rng(seed).beta(alpha, beta, size=batch_size)
    return torch.from_numpy(values).float()


def _base_flow_sigmas(kind: str, batch_size: int, settings: Settings, generator) -> torch.Tensor:
    """Unshifted sigmas on CPU (or the generator's device)."""
    draw_device = _draw_device(generator, "cpu")
    if kind == "flow_use_uniform_schedule":
        return torch.rand(batch_size, generator=generator, device=draw_device)
    if kind == "flow_use_beta_schedule":
        alpha, beta = float(settings.flow_beta_schedule_alpha), float(settings.flow_beta_schedule_beta)
        return _beta_draws(batch_size, alpha, beta, generator)
    if kind == "timestep_bias_strategy":
        # Bias a 1000-step grid like DDPM timesteps, then spread each draw across its bin.
        bins = sample_timesteps(batch_size, FLOW_BIAS_TIMESTEPS, settings, generator, draw_device).float()
        jitter = torch.rand(batch_size, generator=generator, device=draw_device)
        return (bins + jitter) / FLOW_BIAS_TIMESTEPS
    scale = float(settings.flow_sigmoid_scale)
    return torch.sigmoid(scale * torch.randn(batch_size, generator=generator, device=draw_device))


def sample_flow_sigmas(batch_size: int, settings: Settings, generator: torch.Generator | None = None,
                       device="cpu", image_seq_len: int | None = None,
                       auto_shift: AutoShift | None = None) -> torch.Tensor:
    """One flow-matching sigma per sample, float32 in (0, 1) on ``device``.

    Distribution (at most one may be chosen): ``sigmoid(N(0,1) * flow_sigmoid_scale)``
    by default; uniform with flow_use_uniform_schedule; Beta(flow_beta_schedule_alpha,
    flow_beta_schedule_beta) with flow_use_beta_schedule; a biased timestep grid
    when timestep_bias_strategy is set (later = noisier). The result is then
    shifted (see ``flow_shift``).

    flux_fast_schedule instead draws uniformly from FAST_SCHEDULE_SIGMAS, the
    points a 4-step few-step sampler visits, and is never shifted: those are
    exactly the sigmas such a model is asked to denoise at.
    """
    kind = _flow_distribution(settings)
    if kind == "flux_fast_schedule":
        choices = torch.tensor(FAST_SCHEDULE_SIGMAS)
        picks = torch.randint(0, len(FAST_SCHEDULE_SIGMAS), (batch_size,), generator=generator,
                              device=_draw_device(generator, "cpu"))
        sigmas = choices.to(picks.device)[picks]
    else:
        base = _base_flow_sigmas(kind, batch_size, settings, generator)
        sigmas = shift_sigmas(base, flow_shift(settings, image_seq_len, auto_shift))
    return sigmas.clamp(SIGMA_EPS, 1 - SIGMA_EPS).to(device=device, dtype=torch.float32)


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if sigmas.ndim == 1:
        sigmas = sigmas.view(-1, *([1] * (like.ndim - 1)))
    return sigmas.to(device=like.device, dtype=like.dtype)


def flow_noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``(1 - s) * latents + s * noise`` with one sigma per sample (shape (B,) or broadcastable)."""
    s = _per_sample(sigmas, latents)
    return (1 - s) * latents + s * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity a flow-matching model is trained to predict: ``noise - latents``."""
    return noise - latents
