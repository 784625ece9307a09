"""Learning-rate schedules and learning-rate scaling.

Every schedule is a ``torch.optim.lr_scheduler.LambdaLR`` whose multiplier is a
pure function of the step, so resuming from ``state_dict()`` lands on the same
learning rate. All schedules except ``constant`` first ramp linearly from 0 to
the peak over ``lr_warmup_steps``; "progress" below is the fraction of the
post-warmup steps done (0 -> 1).

- linear: falls linearly to 0.
- cosine: one half cosine from the peak to 0.
- cosine_with_restarts: ``lr_num_cycles`` half cosines, jumping back to the peak at each restart.
- sine: a smooth wave with ``lr_num_cycles`` full periods: peak -> 0 -> peak, no jumps.
- polynomial: from the peak to ``lr_end`` along ``(1 - progress) ** lr_power``; stays at lr_end afterwards.
- constant: the peak from the first step (no warmup).
- constant_with_warmup: warmup, then the peak.
"""

from __future__ import annotations

import math
from typing import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from simpletuner.config.settings import Settings

SCHEDULES = ("linear", "sine", "cosine", "cosine_with_restarts", "polynomial", "constant",
             "constant_with_warmup")


def scaled_learning_rate(settings: Settings, num_processes: int = 1) -> float:
    """learning_rate, multiplied by train_batch_size x gradient_accumulation_steps x num_processes
    when lr_scale is on (by the square root of that product with lr_scale_sqrt too)."""
    learning_rate = float(settings.learning_rate)
    if not settings.lr_scale:
        return learning_rate
    factor = int(settings.train_batch_size) * int(settings.gradient_accumulation_steps or 1) * int(num_processes)
    if settings.lr_scale_sqrt:
        return learning_rate * math.sqrt(factor)
    return learning_rate * factor


def _decay_shape(name: str, num_cycles: float, power: float, end_factor: float) -> Callable[[float], float]:
    """Multiplier as a function of post-warmup progress in [0, 1]."""
    if name == "linear":
        return lambda progress: 1.0 - progress
    if name == "cosine":
        return lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "cosine_with_restarts":
        def restarts(progress: float) -> float:
            if progress >= 1.0:
                return 0.0
            return 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))
        return restarts
    if name == "sine":
        return lambda progress: 0.5 * (1.0 + math.cos(2.0 * math.pi * num_cycles * progress))
    if name == "polynomial":
        return lambda progress: end_factor + (1.0 - end_factor) * (1.0 - progress) ** power
    if name == "constant_with_warmup":
        return lambda progress: 1.0
    raise ValueError(f"lr_scheduler={name!r} is not one of {SCHEDULES}.")


def schedule_multiplier(name: str, warmup_steps: int, total_steps: int, num_cycles: float = 1.0,
                        power: float = 1.0, end_factor: float = 0.0) -> Callable[[int], float]:
    """The LambdaLR multiplier for one schedule: step -> factor applied to the peak learning rate."""
    if name == "constant":
        return lambda step: 1.0
    shape = _decay_shape(name, num_cycles, power, end_factor)
    decay_steps = max(1, total_steps - warmup_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return max(0.0, shape(progress))

    return multiplier


def _end_factor(settings: Settings, peak_lr: float) -> float:
    lr_end = float(settings.lr_end or 0.0)
    if not 0 <= lr_end <= peak_lr:
        raise ValueError(f"lr_end={lr_end} must be between 0 and the learning rate ({peak_lr}) for the "
                         "polynomial schedule; lower lr_end or raise learning_rate.")
    return lr_end / peak_lr if peak_lr > 0 else 0.0


def build_lr_scheduler(settings: Settings, optimizer: Optimizer, total_steps: int,
                       num_processes: int = 1) -> LambdaLR:
    """The ``lr_scheduler`` schedule for ``optimizer`` over ``total_steps`` optimizer steps.

    Warmup and total lengths are multiplied by ``num_processes`` because a
    scheduler prepared by accelerate advances once per process on every
    optimizer step; pass 1 when the trainer calls ``step()`` itself once per
    optimizer step. Each parameter group decays from its own lr; for polynomial,
    each group ends at lr_end.
    """
    name = settings.lr_scheduler
    if name not in SCHEDULES:
        raise ValueError(f"lr_scheduler={name!r} is not one of {SCHEDULES}.")
    warmup = int(settings.lr_warmup_steps or 0) * num_processes
    total = int(total_steps) * num_processes
    num_cycles = float(settings.lr_num_cycles or 1)
    if num_cycles <= 0:
        raise ValueError(f"lr_num_cycles={settings.lr_num_cycles} must be above 0.")
    power = float(settings.lr_power if settings.lr_power is not None else 1.0)
    multipliers = []
    for group in optimizer.param_groups:
        peak = float(group.get("initial_lr", group["lr"]))
        end_factor = _end_factor(settings, peak) if name == "polynomial" else 0.0
        multipliers.append(schedule_multiplier(name, warmup, total, num_cycles, power, end_factor))
    return LambdaLR(optimizer, multipliers)
