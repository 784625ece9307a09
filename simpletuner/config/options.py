"""The one declarative option table.

Entries live in topic modules under ``simpletuner.config.option_groups``; each
module defines ``GROUP`` (a heading) and ``OPTIONS`` (a list of ``Option``).
This module gathers them into ``OPTIONS`` (name -> Option) and ``ALIASES``
(alias -> canonical name), refusing duplicates so two modules can never
disagree about one option.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from simpletuner.config import option_groups
from simpletuner.config.option_types import BUILT, PLANNED, Option

__all__ = ["OPTIONS", "ALIASES", "GROUP_ORDER", "canonical_name", "Option", "BUILT", "PLANNED"]


def _collect() -> tuple[dict[str, Option], dict[str, str], list[str]]:
    options: dict[str, Option] = {}
    aliases: dict[str, str] = {}
    groups: list[str] = []
    for info in sorted(pkgutil.iter_modules(option_groups.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{option_groups.__name__}.{info.name}")
        group = module.GROUP
        groups.append(group)
        for entry in module.OPTIONS:
            entry = dataclasses.replace(entry, group=entry.group or group)
            if entry.name in options or entry.name in aliases:
                raise RuntimeError(f"option {entry.name!r} is defined twice (second time in {module.__name__})")
            options[entry.name] = entry
            for alias in entry.aliases:
                if alias in options or alias in aliases:
                    raise RuntimeError(f"alias {alias!r} of {entry.name!r} clashes with another option")
                aliases[alias] = entry.name
    clash = set(options) & set(aliases)
    if clash:
        raise RuntimeError(f"names used both as option and alias: {sorted(clash)}")
    return options, aliases, groups


OPTIONS, ALIASES, GROUP_ORDER = _collect()


def canonical_name(name: str) -> str | None:
    """Map a user-written key (with or without leading dashes, or an alias) to its option name."""
    key = name.lstrip("-").strip()
    if key in OPTIONS:
        return key
    return ALIASES.get(key)
