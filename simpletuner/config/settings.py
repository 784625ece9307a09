"""The resolved configuration handed to every part of the trainer.

``Settings`` is read-only: attribute access returns the value the user set, or
the option's default. Parts of the trainer receive it and read only the
options they own; nothing writes back into it.
"""

from __future__ import annotations

from typing import Any, Mapping


class Settings:
    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any] | None = None):
        from simpletuner.config.options import OPTIONS, canonical_name

        resolved: dict[str, Any] = {}
        for key, value in (values or {}).items():
            name = canonical_name(key)
            if name is None:
                raise KeyError(f"{key!r} is not a known option")
            resolved[name] = value
        object.__setattr__(self, "_values", resolved)
        self._options = OPTIONS  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        from simpletuner.config.options import OPTIONS

        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        if name in OPTIONS:
            return OPTIONS[name].default
        raise AttributeError(f"{name!r} is not a known option")

    def __setattr__(self, name, value):
        if name == "_options":
            return
        raise AttributeError("Settings are read-only; build a new one with replace()")

    def is_set(self, name: str) -> bool:
        """True when the user gave this option explicitly (from any source)."""
        return name in object.__getattribute__(self, "_values")

    def explicit(self) -> dict[str, Any]:
        return dict(object.__getattribute__(self, "_values"))

    def replace(self, **changes: Any) -> "Settings":
        values = self.explicit()
        values.update(changes)
        return Settings(values)

    def as_dict(self) -> dict[str, Any]:
        """Every option with its effective value, keyed by name without dashes."""
        from simpletuner.config.options import OPTIONS

        values = object.__getattribute__(self, "_values")
        return {name: values.get(name, option.default) for name, option in OPTIONS.items()}

    def __repr__(self) -> str:
        return f"Settings({self.explicit()!r})"
