"""Turning raw values from files, the environment or the command line into typed option values."""

from __future__ import annotations

import difflib
from typing import Any

from simpletuner.config.errors import ConfigError
from simpletuner.config.option_types import Option

TRUE_WORDS = {"true", "1", "yes", "y", "on"}
FALSE_WORDS = {"false", "0", "no", "n", "off"}
NONE_WORDS = {"none", "null", ""}


def parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, (int, float)) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in TRUE_WORDS | FALSE_WORDS:
        return raw.strip().lower() in TRUE_WORDS
    raise ValueError("expected true or false (also accepted: 1/0, yes/no, on/off)")


def parse_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError("expected a whole number, got a boolean")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str):
        text = raw.strip()
        try:
            return int(text)
        except ValueError:
            number = float(text)  # accepts "1e3"; raises ValueError for words
            if number.is_integer():
                return int(number)
    raise ValueError("expected a whole number")


def parse_float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError("expected a number, got a boolean")
    if isinstance(raw, (int, float)):
        return float(raw)
    if isinstance(raw, str):
        return float(raw.strip())
    raise ValueError("expected a number")


def parse_str(raw: Any) -> str:
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, (int, float, str)):
        return str(raw)
    if isinstance(raw, (list, dict)):
        import json

        return json.dumps(raw)
    raise ValueError("expected text")


PARSERS = {"bool": parse_bool, "int": parse_int, "float": parse_float, "str": parse_str}


def convert(option: Option, raw: Any, source: str) -> Any:
    """Typed value for ``option`` from ``raw``; raises ConfigError naming the key, value and fix."""
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in NONE_WORDS and option.kind != "str"):
        return None
    try:
        value = option.parse(raw) if option.parse else PARSERS[option.kind](raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            option.name,
            f"{option.name}: the value {raw!r} from {source} is not valid ({exc}). "
            f"Set {option.name} to a {describe_kind(option)}.",
        ) from None
    if option.choices is not None and value is not None and value not in option.choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in option.choices], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            option.name,
            f"{option.name}: {value!r} from {source} is not one of the accepted values "
            f"({', '.join(str(c) for c in option.choices)}).{hint}",
        )
    return value


def describe_kind(option: Option) -> str:
    if option.choices is not None:
        return "one of " + ", ".join(str(c) for c in option.choices)
    return {"bool": "true or false", "int": "whole number", "float": "number", "str": "text value"}[option.kind]


def suggest_option(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
