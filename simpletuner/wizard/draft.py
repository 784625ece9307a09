"""The configuration the wizard is building or editing.

A ``Draft`` remembers the config file exactly as it was read (key spelling,
order, raw values) and the answers given since. Writing keeps every entry that
was there, replaces only the ones whose answer differs, and adds new keys only
when ``availability.should_write`` allows it. Options that are not built yet are
never written; the summary lists them instead.
"""

from __future__ import annotations

from typing import Any

from simpletuner.config.errors import ConfigError
from simpletuner.config.options import OPTIONS, canonical_name
from simpletuner.config.values import convert
from simpletuner.wizard import availability


class Draft:
    def __init__(self, raw: dict[str, Any] | None = None, source: str = "a new config"):
        self.editing = raw is not None
        self.raw: dict[str, Any] = dict(raw or {})
        self.key_of: dict[str, str] = {}  # option name -> key as written in the file
        self.loaded: dict[str, Any] = {}  # option name -> typed value from the file
        self.answers: dict[str, Any] = {}
        self.unreadable: list[str] = []  # problems with values in the file (kept as they were)
        for key, value in self.raw.items():
            name = canonical_name(key)
            if name is None:
                continue
            self.key_of[name] = key
            try:
                self.loaded[name] = convert(OPTIONS[name], value, source)
            except ConfigError as exc:
                self.unreadable.append(str(exc))

    def current(self, name: str) -> Any:
        """The value as it stands now: this session's answer, else the file's, else the option default."""
        if name in self.answers:
            return self.answers[name]
        if name in self.loaded:
            return self.loaded[name]
        return OPTIONS[name].default

    def suggestion(self, name: str, recommended: Any) -> Any:
        """Default for a question: the current value when editing or already answered, else ``recommended``."""
        if name in self.answers or name in self.loaded or self.editing:
            return self.current(name)
        return recommended

    def set(self, name: str, value: Any) -> None:
        self.answers[name] = value

    def changed(self) -> list[tuple[str, Any, Any]]:
        """(option, before, after) for every answer that changes what would be trained."""
        changes = []
        for name, value in self.answers.items():
            before = self.loaded.get(name, OPTIONS[name].default)
            if value != before and (name in self.loaded or availability.should_write(name, value)):
                changes.append((name, before, value))
        return changes

    def not_written(self) -> list[tuple[str, Any]]:
        """Answers dropped because their option is not built yet (name, value)."""
        return [(name, value) for name, value in self.answers.items()
                if name not in self.loaded and availability.is_planned(name) and not OPTIONS[name].required
                and value != OPTIONS[name].default]

    def output(self) -> dict[str, Any]:
        """The dict to write as config.json."""
        out: dict[str, Any] = {}
        for key, raw_value in self.raw.items():
            name = canonical_name(key)
            if name is None or name not in self.answers or self.answers[name] == self.loaded.get(name, raw_value):
                out[key] = raw_value
            elif self.answers[name] is not None:
                out[key] = self.answers[name]
        for name, value in self.answers.items():
            if name not in self.key_of and availability.should_write(name, value) and value is not None:
                out[name] = value
        return out
