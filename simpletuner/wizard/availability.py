"""What the wizard may offer on this machine, read from the option table at run time.

The option table's ``status`` changes as features land, so nothing here is
hard-coded: an option is offered when it is built or required, and a choice is
offered when it is built and its hardware requirement (if any) is met here.
"""

from __future__ import annotations

from typing import Any

from simpletuner.config import hardware
from simpletuner.config.option_types import BUILT, Option
from simpletuner.config.options import OPTIONS


def option(name: str) -> Option:
    return OPTIONS[name]


def is_offered(name: str) -> bool:
    """True when the trainer honours this option (or must have it), so asking about it makes sense."""
    entry = OPTIONS.get(name)
    return entry is not None and (entry.status == BUILT or entry.required)


def is_planned(name: str) -> bool:
    entry = OPTIONS.get(name)
    return entry is not None and entry.status != BUILT


def usable_choices(name: str) -> list[Any]:
    """The option's choices minus those not built yet and those this machine cannot run."""
    entry = OPTIONS[name]
    usable = []
    for choice in entry.choices or ():
        if choice in entry.planned_choices:
            continue
        requirement = entry.gated_choices.get(choice)
        if requirement is not None and hardware.unmet(requirement):
            continue
        usable.append(choice)
    return usable


def hidden_choices(name: str) -> list[str]:
    """Lines naming the choices left out by ``usable_choices`` and why, for the user."""
    entry = OPTIONS[name]
    lines = []
    for choice in entry.choices or ():
        if choice in entry.planned_choices:
            lines.append(f"{choice} (not implemented yet)")
            continue
        requirement = entry.gated_choices.get(choice)
        needs = hardware.unmet(requirement) if requirement is not None else None
        if needs:
            lines.append(f"{choice} (needs {needs})")
    return lines


def should_write(name: str, value: Any) -> bool:
    """A new key is written when it is offered and either required or different from its default."""
    entry = OPTIONS.get(name)
    if entry is None or not is_offered(name):
        return False
    return entry.required or value != entry.default
