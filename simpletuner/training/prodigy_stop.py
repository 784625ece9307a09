"""Prodigy that can stop adapting its step size (the ``prodigy_steps`` option)."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import prodigyopt
import torch


class ProdigyWithStop(prodigyopt.Prodigy):
    """prodigyopt's Prodigy whose step-size estimate ``d`` is frozen after ``prodigy_steps`` steps.

    Prodigy re-estimates ``d`` (its learned learning-rate multiplier) every
    step; freezing it late in a run stops the step size from drifting. The
    frozen value lives in the param groups, so it is saved and restored with
    the optimizer state. ``prodigy_steps=None`` or 0 adapts throughout. The
    other arguments are Prodigy's own.
    """

    def __init__(self, params: Iterable, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 beta3: float | None = None, eps: float = 1e-8, weight_decay: float = 0.0, decouple: bool = True,
                 use_bias_correction: bool = False, safeguard_warmup: bool = False, d0: float = 1e-6,
                 d_coef: float = 1.0, growth_rate: float = math.inf, slice_p: int = 1,
                 prodigy_steps: int | None = None):
        super().__init__(params, lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay,
                         decouple=decouple, use_bias_correction=use_bias_correction,
                         safeguard_warmup=safeguard_warmup, d0=d0, d_coef=d_coef, growth_rate=growth_rate,
                         slice_p=slice_p)
        for group in self.param_groups:
            group.setdefault("prodigy_steps", prodigy_steps or 0)
            group.setdefault("frozen_d", None)

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = super().step(closure)
        first = self.param_groups[0]
        limit = first["prodigy_steps"]
        if limit and first["k"] >= limit:
            frozen = first["frozen_d"] if first["frozen_d"] is not None else first["d"]
            for group in self.param_groups:
                group["frozen_d"] = frozen
                group["d"] = frozen
                group["d_max"] = frozen
        return loss
