"""Changes applied to loaded model components before training: the place for attention
backends, quantization of frozen weights and offloading (each in its own module).

Steps run in order; each takes (family, components, settings, device) and changes the
components in place. A step whose option is at its default does nothing.
"""

from __future__ import annotations

from typing import Callable

from simpletuner.config.settings import Settings

SETUP_STEPS: list[Callable] = []


def prepare_components(family, components, settings: Settings, device) -> None:
    for step in SETUP_STEPS:
        step(family, components, settings, device)
