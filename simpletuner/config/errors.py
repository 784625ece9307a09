"""Configuration errors: one paragraph each, naming the key, the value and the fix."""

from __future__ import annotations


class ConfigError(Exception):
    """A problem with the user's configuration. ``key`` is the option or file it concerns."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigErrors(Exception):
    """Several configuration problems found in one pass, reported together."""

    def __init__(self, errors: list[ConfigError]):
        super().__init__("\n\n".join(str(e) for e in errors))
        self.errors = errors

    @classmethod
    def raise_if_any(cls, errors: list[ConfigError]) -> None:
        if errors:
            raise cls(errors)
