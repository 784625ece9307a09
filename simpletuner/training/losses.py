"""Training targets and the diffusion loss.

The loss is computed element-wise (l2, pseudo-Huber or smooth L1), optionally
masked, reduced to one value per sample, optionally weighted per sample by
min-SNR, and finally averaged over the batch.

Noise level: DDPM-style schedulers describe a timestep by alphas_cumprod
(``snr = a / (1 - a)``). Flow-matching callers pass
``timesteps = sigma * num_train_timesteps`` and the noise level is sigma itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from simpletuner.config.settings import Settings

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_matching")
LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")


def training_target(prediction_type: str, scheduler, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the model output is compared with for ``prediction_type``."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    if prediction_type == "flow_matching":
        return noise - latents
    raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}.")


def compute_snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``a / (1 - a)`` of each timestep, a = alphas_cumprod (float32, on timesteps' device)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    alpha = alphas_cumprod[timesteps.long()]
    return alpha / (1 - alpha)


def _num_train_timesteps(scheduler) -> int:
    return int(scheduler.config.num_train_timesteps)


def _noise_to_signal(scheduler, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Noise std over signal std at each timestep (0 = clean, large = mostly noise)."""
    if prediction_type == "flow_matching":
        sigma = (timesteps.float() / _num_train_timesteps(scheduler)).clamp(0, 1)
        return sigma / (1 - sigma).clamp_min(1e-6)
    return compute_snr(scheduler, timesteps).clamp_min(1e-12).rsqrt()


def huber_thresholds(timesteps: torch.Tensor, scheduler, settings: Settings, prediction_type: str) -> torch.Tensor:
    """Per-sample Huber threshold c (B,), from ``huber_c`` and ``huber_schedule``.

    constant: c = huber_c everywhere. exponential: c = huber_c ** (t / T), i.e. 1
    at t=0 falling to huber_c at the last timestep. snr: c = huber_c +
    (1 - huber_c) / (1 + noise/signal)**2, also 1 for clean inputs and huber_c
    for pure noise. Small c behaves like L1 (robust to outliers) at noisy steps.
    """
    schedule, base = settings.huber_schedule, float(settings.huber_c)
    if base <= 0:
        raise ValueError(f"huber_c={base} must be above 0.")
    if schedule == "constant":
        return torch.full(timesteps.shape, base, dtype=torch.float32, device=timesteps.device)
    if schedule == "exponential":
        fraction = timesteps.float() / _num_train_timesteps(scheduler)
        return base ** fraction
    if schedule == "snr":
        ratio = _noise_to_signal(scheduler, timesteps, prediction_type)
        return base + (1 - base) / (1 + ratio) ** 2
    raise ValueError(f"huber_schedule={schedule!r} is not one of {HUBER_SCHEDULES}.")


def elementwise_loss(residual: torch.Tensor, loss_type: str, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Loss per element of ``prediction - target``.

    l2: r^2. huber (pseudo-Huber): 2c(sqrt(r^2 + c^2) - c), which is r^2 for
    |r| << c and 2c|r| for |r| >> c. smooth_l1: the same curve divided by c,
    i.e. r^2/c near zero and 2|r| far out. ``threshold`` is c, broadcastable.
    """
    if loss_type == "l2":
        return residual.square()
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}.")
    c = threshold
    soft_abs = torch.sqrt(residual.square() + c.square()) - c
    return 2 * c * soft_abs if loss_type == "huber" else 2 * soft_abs


def _per_sample_mean(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over every non-batch dimension; with a mask, the mean over the masked-in elements."""
    dims = tuple(range(1, loss.ndim))
    if mask is None:
        return loss.mean(dim=dims)
    mask = _fit_mask(mask, loss).to(loss.dtype)
    mask = mask.expand_as(loss)
    return (loss * mask).sum(dim=dims) / mask.sum(dim=dims).clamp_min(1e-8)


def _fit_mask(mask: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """A (B,1,h,w[,...]) mask resized (area-averaged) to the loss's spatial size when they differ."""
    if mask.ndim != loss.ndim or mask.shape[0] != loss.shape[0] or mask.shape[1] not in (1, loss.shape[1]):
        raise ValueError(f"loss mask of shape {tuple(mask.shape)} does not fit a prediction of shape "
                         f"{tuple(loss.shape)}; expected (B, 1, *spatial).")
    mask = mask.to(device=loss.device, dtype=torch.float32)
    if mask.shape[2:] != loss.shape[2:]:
        mask = F.interpolate(mask, size=loss.shape[2:], mode="area")
    return mask


def min_snr_weights(scheduler, timesteps: torch.Tensor, settings: Settings,
                    prediction_type: str) -> torch.Tensor | None:
    """Per-sample min-SNR weights (B,), or None when weighting is off or does not apply (flow matching).

    The weight on the data (x0) error is min(snr, gamma) (hard, ``snr_gamma``) or
    the smooth ``snr * g / (snr + g)`` with ``use_soft_min_snr``, where
    g = 1 / soft_min_snr_sigma_data**2 when that is set, else snr_gamma. It is
    converted to the model's own error: divided by snr for epsilon and by
    snr + 1 for v_prediction (sample predicts x0 directly).
    """
    gamma = float(settings.snr_gamma or 0.0)
    soft = bool(settings.use_soft_min_snr)
    if prediction_type == "flow_matching" or (gamma <= 0 and not soft):
        return None
    snr = compute_snr(scheduler, timesteps)
    if soft:
        cap = _soft_min_snr_cap(settings, gamma)
        return _soft_weights(snr, cap, prediction_type)
    return _hard_weights(snr, gamma, prediction_type)


def _soft_min_snr_cap(settings: Settings, gamma: float) -> float:
    sigma_data = settings.soft_min_snr_sigma_data
    if sigma_data is not None:
        if float(sigma_data) <= 0:
            raise ValueError(f"soft_min_snr_sigma_data={sigma_data} must be above 0.")
        return 1.0 / float(sigma_data) ** 2
    if gamma > 0:
        return gamma
    raise ValueError("use_soft_min_snr needs soft_min_snr_sigma_data (the data's standard deviation, "
                     "e.g. 1.0) or snr_gamma to be set.")


def _hard_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        # min(snr, g) / snr, written so snr == 0 (zero terminal SNR) gives 1, not 0/0.
        return (gamma / snr).clamp(max=1.0)
    if prediction_type == "v_prediction":
        return snr.clamp(max=gamma) / (snr + 1)
    if prediction_type == "sample":
        return snr.clamp(max=gamma)
    raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}.")


def _soft_weights(snr: torch.Tensor, cap: float, prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return cap / (snr + cap)
    if prediction_type == "v_prediction":
        return snr * cap / ((snr + cap) * (snr + 1))
    if prediction_type == "sample":
        return snr * cap / (snr + cap)
    raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}.")


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler,
                   settings: Settings, prediction_type: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar training loss: element-wise loss -> (masked) per-sample mean -> min-SNR weight -> batch mean.

    Without min-SNR weighting, a DDPM-style (not flow-matching) loss is multiplied by ``snr_weight`` instead.

    ``mask`` (B, 1, h, w), 1 = train on this pixel, is resized to the prediction's
    spatial size if needed; each sample's loss is the mean over its masked-in elements.
    """
    prediction, target = prediction.float(), target.float()
    loss_type = settings.loss_type or "l2"
    threshold = None
    if loss_type != "l2":
        c = huber_thresholds(timesteps, scheduler, settings, prediction_type).to(prediction.device)
        threshold = c.view(-1, *([1] * (prediction.ndim - 1)))
    per_element = elementwise_loss(prediction - target, loss_type, threshold)
    per_sample = _per_sample_mean(per_element, mask)
    weights = min_snr_weights(scheduler, timesteps, settings, prediction_type)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    elif prediction_type != "flow_matching":
        per_sample = per_sample * float(1.0 if settings.snr_weight is None else settings.snr_weight)
    return per_sample.mean()
