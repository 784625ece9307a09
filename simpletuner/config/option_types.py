"""The shape of one entry in the option table.

Every option the trainer knows is one ``Option``. The parser, config-file
validation, ``--help``, the wizard and documentation/OPTIONS.md are all built
from these entries, so adding an option means adding one entry in one of the
``option_groups`` modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

# Implementation status of an option.
BUILT = "built"  # the trainer reads and honours it
PLANNED = "planned"  # parses, but setting a non-default value stops the run: "not implemented yet"

STATUSES = (BUILT, PLANNED)

# Value kinds. "bool" options accept true/false/1/0/yes/no and may be given bare.
KINDS = ("bool", "int", "float", "str")


@dataclass(frozen=True)
class Option:
    name: str
    kind: str
    default: Any
    help: str
    group: str
    choices: tuple | None = None
    status: str = PLANNED
    aliases: tuple[str, ...] = ()
    # Choices that parse but are not built yet (each stops the run with "not implemented yet").
    planned_choices: tuple = ()
    # Choices that need particular hardware or packages: choice -> requirement key
    # (see simpletuner.config.hardware.REQUIREMENTS).
    gated_choices: Mapping[Any, str] = field(default_factory=dict)
    # Hardware/package requirement of the option itself (any non-default value needs it).
    requires: str | None = None
    # Required for `simpletuner train` (the reference marks these as mandatory).
    required: bool = False
    # For "str" options that are really numbers-or-strings etc.; None means plain kind parsing.
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    # Why a PLANNED option (or planned choice) is not built; added to its "not implemented yet" error.
    unbuilt_reason: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name}: kind {self.kind!r} is not one of {KINDS}")
        if self.status not in STATUSES:
            raise ValueError(f"option {self.name}: status {self.status!r} is not one of {STATUSES}")
        for choice in self.planned_choices:
            if self.choices is None or choice not in self.choices:
                raise ValueError(f"option {self.name}: planned choice {choice!r} is not a choice")
        for choice in self.gated_choices:
            if self.choices is None or choice not in self.choices:
                raise ValueError(f"option {self.name}: gated choice {choice!r} is not a choice")


def opt(name: str, kind: str, default: Any, help: str, **kwargs) -> Option:
    """Shorthand used by the option_groups modules; ``group`` is filled in by the module."""
    return Option(name=name, kind=kind, default=default, help=help, group=kwargs.pop("group", ""), **kwargs)
