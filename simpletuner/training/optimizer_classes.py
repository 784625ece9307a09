"""Optimizer classes of our own, for training weights stored in bfloat16.

A bf16 number has 8 bits of mantissa, so an update smaller than half the
spacing between neighbouring bf16 values is rounded away and the weight never
moves. Two remedies live here:

- ``AdamWBF16`` rounds each new weight *stochastically*: up or down with
  probabilities proportional to the distance, so small updates survive on
  average. Its moment estimates are kept in fp32.
- ``AdamWScheduleFreeKahan`` is schedule-free AdamW (the ``schedulefree``
  package's algorithm and state layout) that keeps a small Kahan compensation
  buffer per low-precision tensor, holding the part of each write that rounding
  threw away and adding it back on the next write.

fp32 parameters work with both; the low-precision handling is skipped.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

_LOW_PRECISION = (torch.bfloat16, torch.float16)
# Mask that clears the 16 low bits of an fp32 bit pattern (0xFFFF0000 as a signed int32).
_BF16_KEEP_MASK = -65536


def stochastic_round_to_bf16(value: torch.Tensor) -> torch.Tensor:
    """Round an fp32 tensor to bf16, up or down at random in proportion to the remainder.

    Adding uniform noise to the 16 bits that bf16 drops and then truncating them
    makes the expected result equal the fp32 input. Non-finite values pass
    through unchanged.
    """
    bits = value.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    rounded = (bits + noise).bitwise_and_(_BF16_KEEP_MASK).view(torch.float32)
    rounded = torch.where(torch.isfinite(value), rounded, value)
    return rounded.to(torch.bfloat16)


class _Fp32StateOnLoad:
    """Keep chosen state tensors in fp32 when an optimizer state dict is loaded.

    ``torch.optim.Optimizer.load_state_dict`` casts floating state to each
    parameter's dtype, which would turn fp32 moment estimates of bf16 weights
    into bf16 and undo the point of keeping them in fp32.
    """

    fp32_state_keys: tuple[str, ...] = ()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # type: ignore[misc]
        params = [p for group in self.param_groups for p in group["params"]]  # type: ignore[attr-defined]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for param, saved_id in zip(params, saved_ids):
            saved = state_dict["state"].get(saved_id, {})
            for key in self.fp32_state_keys:
                if key in saved:
                    state = self.state[param]  # type: ignore[attr-defined]
                    state[key] = saved[key].to(device=param.device, dtype=torch.float32)


class AdamWBF16(_Fp32StateOnLoad, torch.optim.Optimizer):
    """AdamW with decoupled weight decay that updates bf16 weights by stochastic rounding.

    Memory per weight: the weight itself plus two fp32 moments (no fp32 master
    copy). fp16 weights are rounded to nearest; fp32 weights are updated exactly.
    """

    fp32_state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        stochastic_rounding: bool = True,
    ):
        if lr < 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"adamw_bf16 needs lr >= 0, eps > 0, weight_decay >= 0 (got {lr}, {eps}, {weight_decay})")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"adamw_bf16 betas must each be in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        if param.grad.is_sparse:
            raise RuntimeError("adamw_bf16 does not support sparse gradients")
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
        state["step"] += 1
        step = state["step"].item()
        grad = param.grad.to(torch.float32)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
        new_value = param.to(torch.float32, copy=True)
        new_value.mul_(1 - lr * decay)
        new_value.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
        if param.dtype == torch.bfloat16 and group["stochastic_rounding"]:
            param.copy_(stochastic_round_to_bf16(new_value))
        else:
            param.copy_(new_value)


def _compensated(tensor: torch.Tensor, state: dict, key: str) -> torch.Tensor:
    """An fp32 copy of ``tensor`` plus whatever rounding removed on its last write."""
    value = tensor.to(torch.float32, copy=True)
    if key in state:
        value.add_(state[key])
    return value


def _write_compensated(tensor: torch.Tensor, value: torch.Tensor, state: dict, key: str) -> None:
    """Store fp32 ``value`` into ``tensor``, remembering the rounding error for low precision."""
    tensor.copy_(value)
    if tensor.dtype in _LOW_PRECISION:
        state[key] = (value - tensor.to(torch.float32)).to(tensor.dtype)


class AdamWScheduleFreeKahan(_Fp32StateOnLoad, torch.optim.Optimizer):
    """Schedule-free AdamW with Kahan-compensated writes for bf16/fp16 weights.

    Follows the schedulefree package's AdamWScheduleFree: the same averaging
    and warmup rules, param-group keys and state names (``z``, ``exp_avg_sq``),
    and ``train()``/``eval()`` to swap between the gradient point and the
    averaged weights. Differences: the arithmetic runs in fp32;
    ``exp_avg_sq`` is kept in fp32; low-precision weights and their ``z``
    sequence each get a compensation buffer (``y_compensation``,
    ``z_compensation``) in the weight's dtype.
    """

    fp32_state_keys = ("exp_avg_sq",)

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
    ):
        if lr < 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"schedule-free AdamW needs lr >= 0, eps > 0, weight_decay >= 0 "
                             f"(got {lr}, {eps}, {weight_decay})")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps,
                        r=r, weight_lr_power=weight_lr_power, k=0, train_mode=False, weight_sum=0.0,
                        lr_max=-1.0, scheduled_lr=0.0)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        if not self.param_groups[0]["train_mode"]:
            raise RuntimeError("schedule-free optimizer stepped while in eval mode; call optimizer_train_mode() first")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, averaging_weight = self._advance_schedule(group)
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group, lr, averaging_weight)
        return loss

    @staticmethod
    def _advance_schedule(group: dict) -> tuple[float, float]:
        """Warmup-scaled lr for this step and the weight of the newest iterate in the average."""
        step = group["k"] + 1
        warmup = group["warmup_steps"]
        lr = group["lr"] * (step / warmup if step <= warmup else 1.0)
        group["scheduled_lr"] = lr
        group["lr_max"] = max(lr, group["lr_max"])
        weight = (step ** group["r"]) * (group["lr_max"] ** group["weight_lr_power"])
        group["weight_sum"] = group["weight_sum"] + weight
        group["k"] = step
        averaging_weight = weight / group["weight_sum"] if group["weight_sum"] != 0 else 0.0
        return lr, averaging_weight

    def _update(self, param: torch.Tensor, group: dict, lr: float, averaging_weight: float) -> None:
        beta1, beta2 = group["betas"]
        state = self.state[param]
        if "z" not in state:
            state["z"] = param.detach().clone()
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
        grad = param.grad.to(torch.float32)
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq / (1 - beta2 ** group["k"])).sqrt_().add_(group["eps"])
        direction = grad.div_(denom)
        y = _compensated(param, state, "y_compensation")
        z = _compensated(state["z"], state, "z_compensation")
        if group["weight_decay"] != 0:
            direction.add_(y, alpha=group["weight_decay"])
        y.lerp_(z, averaging_weight)
        y.add_(direction, alpha=lr * (beta1 * (1 - averaging_weight) - 1))
        z.sub_(direction, alpha=lr)
        _write_compensated(param, y, state, "y_compensation")
        _write_compensated(state["z"], z, state, "z_compensation")

    @torch.no_grad()
    def _move_towards_z(self, fraction_of_beta1: Callable[[float], float], train_mode: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] == train_mode:
                continue
            weight = fraction_of_beta1(group["betas"][0])
            for param in group["params"]:
                state = self.state[param]
                if "z" in state:
                    y = _compensated(param, state, "y_compensation")
                    y.lerp_(_compensated(state["z"], state, "z_compensation"), weight)
                    _write_compensated(param, y, state, "y_compensation")
            group["train_mode"] = train_mode

    def eval(self) -> None:
        """Swap the weights to the averaged point x (for validation and saving)."""
        self._move_towards_z(lambda beta1: 1 - 1 / beta1, train_mode=False)

    def train(self) -> None:
        """Swap the weights back to the point y where gradients are taken."""
        self._move_towards_z(lambda beta1: 1 - beta1, train_mode=True)
