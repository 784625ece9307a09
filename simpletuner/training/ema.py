"""Exponential moving average of the trainable parameters.

``shadow = decay * shadow + (1 - decay) * param`` every ``ema_update_interval``
optimizer steps. Where the shadow copy lives:

- ema_device=accelerator: next to the parameters; updates are in place there.
- ema_device=cpu: kept on CPU between updates and moved to the parameters'
  device for each update (fast math, no accelerator memory held between updates).
- ema_cpu_only (with ema_device=cpu): never leaves the CPU; the parameters are
  copied to CPU for the update instead.

The shadow keeps each parameter's dtype. Updates use the ``torch._foreach``
kernels unless ema_foreach_disable is set.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

from simpletuner.config.settings import Settings

EMA_DEVICES = ("accelerator", "cpu")


class EMA:
    def __init__(self, parameters: Iterable[torch.nn.Parameter], settings: Settings):
        self.parameters = list(parameters)
        self.decay = float(settings.ema_decay)
        if not 0 <= self.decay < 1:
            raise ValueError(f"ema_decay={self.decay} must be in [0, 1); values like 0.999 are typical.")
        self.update_interval = max(1, int(settings.ema_update_interval or 1))
        device_choice = settings.ema_device or "cpu"
        if device_choice not in EMA_DEVICES:
            raise ValueError(f"ema_device={device_choice!r} is not one of {EMA_DEVICES}.")
        self.on_cpu = device_choice == "cpu"
        self.cpu_only = self.on_cpu and bool(settings.ema_cpu_only)
        self.use_foreach = not settings.ema_foreach_disable
        self.num_updates = 0
        with torch.no_grad():
            self.shadow = [p.detach().to("cpu", copy=True) if self.on_cpu else p.detach().clone()
                           for p in self.parameters]

    def _targets(self, parameters: Iterable[torch.nn.Parameter] | None) -> list[torch.nn.Parameter]:
        targets = self.parameters if parameters is None else list(parameters)
        if len(targets) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} parameters but was given {len(targets)}.")
        return targets

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Fold the current parameters into the average when ``step`` is on the update interval.

        Returns True when an update happened.
        """
        if step % self.update_interval != 0:
            return False
        weight = 1.0 - self.decay
        if self.cpu_only:
            sources = [p.detach().to("cpu") for p in self.parameters]
            self._lerp(self.shadow, sources, weight)
        elif self.on_cpu:
            working = [s.to(p.device, non_blocking=True) for s, p in zip(self.shadow, self.parameters)]
            self._lerp(working, [p.detach() for p in self.parameters], weight)
            for stored, updated in zip(self.shadow, working):
                stored.copy_(updated)
        else:
            self._lerp(self.shadow, [p.detach() for p in self.parameters], weight)
        self.num_updates += 1
        return True

    def _lerp(self, averages: list[torch.Tensor], sources: list[torch.Tensor], weight: float) -> None:
        sources = [s.to(a.dtype) for a, s in zip(averages, sources)]
        if self.use_foreach:
            torch._foreach_lerp_(averages, sources, weight)
        else:
            for average, source in zip(averages, sources):
                average.lerp_(source, weight)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter] | None = None) -> None:
        """Overwrite ``parameters`` (default: the tracked ones) with the averaged weights."""
        for param, average in zip(self._targets(parameters), self.shadow):
            param.copy_(average.to(device=param.device, dtype=param.dtype))

    @contextmanager
    def swapped_in(self, parameters: Iterable[torch.nn.Parameter] | None = None) -> Iterator[None]:
        """Put the averaged weights into ``parameters`` for the ``with`` block, then restore the trained ones."""
        targets = self._targets(parameters)
        with torch.no_grad():
            # The trained weights wait on CPU so the swap costs no accelerator memory.
            backup = [p.detach().to("cpu", copy=True) for p in targets]
        self.copy_to(targets)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(targets, backup):
                    param.copy_(saved.to(param.device))

    def state_dict(self) -> dict:
        """Decay, interval, update count and the averaged tensors (the live ones: save, do not modify)."""
        return {
            "decay": self.decay,
            "update_interval": self.update_interval,
            "num_updates": self.num_updates,
            "shadow": [s.detach() for s in self.shadow],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore the averaged weights and update count; decay and interval stay as configured now."""
        saved = state["shadow"]
        if len(saved) != len(self.shadow):
            raise ValueError(f"EMA state holds {len(saved)} tensors but {len(self.shadow)} parameters are "
                             "trained now; the checkpoint was made with a different set of trainable weights.")
        for index, (current, stored) in enumerate(zip(self.shadow, saved)):
            if current.shape != stored.shape:
                raise ValueError(f"EMA tensor {index} has shape {tuple(stored.shape)} in the checkpoint but "
                                 f"{tuple(current.shape)} now; the checkpoint does not match this model.")
            current.copy_(stored.to(device=current.device, dtype=current.dtype))
        self.num_updates = int(state.get("num_updates", 0))
