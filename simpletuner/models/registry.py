"""model_family name -> ModelFamily class.

Family modules register their classes with ``@register`` when imported.
``get_family`` imports the one module it needs, so importing this registry
costs nothing (no torch, no diffusers) and the CLI starts fast.

Adding a family: write its module, decorate the class with ``@register``, and
add one line to ``FAMILY_MODULES``.

``legacy`` (SimpleTuner's older name for SD 1.x/2.x) resolves by flavour:
it is sd2x when model_flavour is one of sd2x's flavours, otherwise sd1x.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simpletuner.models.base import ModelFamily

# Which module defines each family. Every model_family value is listed; a family whose
# module does not exist yet is reported as "not implemented yet".
FAMILY_MODULES: dict[str, str] = {
    "sd1x": "simpletuner.models.sd",
    "sd2x": "simpletuner.models.sd",
    "sdxl": "simpletuner.models.sdxl",
    "kolors": "simpletuner.models.kolors",
    "deepfloyd": "simpletuner.models.deepfloyd",
    "sd3": "simpletuner.models.sd3",
    "flux": "simpletuner.models.flux",
    "pixart_sigma": "simpletuner.models.pixart",
    "sana": "simpletuner.models.sana",
    "auraflow": "simpletuner.models.auraflow",
    "lumina2": "simpletuner.models.lumina2",
    "qwen_image": "simpletuner.models.qwen_image",
    "hidream": "simpletuner.models.hidream",
    "omnigen": "simpletuner.models.omnigen",
    "cosmos2image": "simpletuner.models.cosmos",
    "wan": "simpletuner.models.wan",
    "ltxvideo": "simpletuner.models.ltxvideo",
}
LEGACY_NAME = "legacy"

FAMILIES: dict[str, type[ModelFamily]] = {}


class UnknownFamilyError(KeyError):
    """model_family names no family this build has. A KeyError whose message prints without quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class FamilyNotBuiltError(UnknownFamilyError):
    """model_family is a valid name whose model code has not been written yet."""


def register(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: add ``cls`` under ``cls.name``; a second class with the same name is refused."""
    name = cls.__dict__.get("name")
    if not name:
        raise TypeError(f"{cls.__qualname__} must define its own class attribute 'name' to be registered")
    existing = FAMILIES.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"model family {name!r} is already registered by {existing.__module__}.{existing.__qualname__}; "
            f"{cls.__module__}.{cls.__qualname__} needs a different name"
        )
    FAMILIES[name] = cls
    return cls


def available_families() -> list[str]:
    """Families whose model code exists in this build."""
    return sorted(name for name, module in FAMILY_MODULES.items() if importlib.util.find_spec(module) is not None)


def known_families() -> list[str]:
    """Every name get_family accepts, legacy included."""
    return sorted(FAMILY_MODULES) + [LEGACY_NAME]


def _flavour_of(flavour_or_settings: Any) -> str | None:
    """Accept a model_flavour string, or Settings (anything with .model_flavour), or None."""
    return getattr(flavour_or_settings, "model_flavour", flavour_or_settings)


def resolve_name(name: str, flavour_or_settings: Any = None) -> str:
    """The family name ``name`` stands for (only ``legacy`` changes)."""
    if name != LEGACY_NAME:
        return name
    sd2x = get_family("sd2x")
    return "sd2x" if _flavour_of(flavour_or_settings) in sd2x.flavours else "sd1x"


def get_family(name: str, flavour_or_settings: Any = None) -> type[ModelFamily]:
    """The class for a model_family value, importing its module on first use.

    The second argument (a model_flavour string or the Settings) is only
    consulted for ``legacy``. Unknown names raise ``UnknownFamilyError``.
    """
    name = resolve_name(name, flavour_or_settings)
    module = FAMILY_MODULES.get(name)
    if module is None:
        raise UnknownFamilyError(
            f"model_family={name!r} is not available; choose one of: {', '.join(known_families())}"
        )
    if importlib.util.find_spec(module) is None:
        raise FamilyNotBuiltError(
            f"model_family={name} is not implemented yet; families available now: {', '.join(available_families())}"
        )
    importlib.import_module(module)
    if name not in FAMILIES:
        raise RuntimeError(f"{module} was imported but did not register model family {name!r}")
    return FAMILIES[name]
