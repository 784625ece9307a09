"""What the wizard can learn about a model family: is its code available, and its flavours.

Families come from the option table's model_family choices. Flavours come from
the family's own class when its code is importable (``simpletuner.models.registry``),
otherwise from the short hint list in ``recommendations``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from simpletuner.wizard.recommendations import defaults_for

LEGACY_PARTS = ("sd1x", "sd2x")


@dataclass(frozen=True)
class FamilyInfo:
    name: str
    available: bool  # its model code is importable, so a config for it can train
    flavours: dict[str, str] = field(default_factory=dict)  # flavour -> default model location ("" if unknown)
    default_flavour: str | None = None


def _registry():
    try:
        return importlib.import_module("simpletuner.models.registry")
    except ImportError:
        return None


def available_families() -> set[str]:
    registry = _registry()
    if registry is None:
        return set()
    return set(registry.known_families())


def describe(name: str) -> FamilyInfo:
    """Flavours and availability of ``name``; loading the family's class can take a few seconds (torch)."""
    registry = _registry()
    if registry is None or name not in registry.known_families():
        return FamilyInfo(name, False, {flavour: "" for flavour in defaults_for(name).flavour_hint})
    parts = LEGACY_PARTS if name == registry.LEGACY_NAME else (name,)
    flavours: dict[str, str] = {}
    default_flavour = None
    for part in parts:
        family = registry.get_family(part)
        flavours.update(family.flavours)
        default_flavour = default_flavour or family.default_flavour
    return FamilyInfo(name, True, flavours, default_flavour)
