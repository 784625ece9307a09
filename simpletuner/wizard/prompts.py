"""Small wrappers over questionary.

Every question uses ``unsafe_ask`` so Ctrl-C raises KeyboardInterrupt (questionary's
``ask`` would swallow it and return None); the CLI turns that into exit status 130.
Numbers are asked as text with a validator, then converted.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import questionary
from questionary import Choice

# Long lists get a type-to-filter search box; short ones are plain arrow-key menus.
SEARCH_FILTER_MIN_CHOICES = 8


def say(text: str = "") -> None:
    print(text, flush=True)


def select(message: str, choices: Sequence[Any], default: Any = None) -> Any:
    """Pick one of ``choices`` (plain values or questionary Choice objects)."""
    items = [c if isinstance(c, Choice) else Choice(title=str(c), value=c) for c in choices]
    values = [item.value for item in items]
    searchable = len(items) >= SEARCH_FILTER_MIN_CHOICES
    return questionary.select(
        message,
        choices=items,
        default=default if default in values else None,
        use_search_filter=searchable,
        use_jk_keys=not searchable,
        instruction="(type to filter, arrows to move, Enter to pick)" if searchable else None,
    ).unsafe_ask()


def confirm(message: str, default: bool = True) -> bool:
    return bool(questionary.confirm(message, default=default).unsafe_ask())


def text(message: str, default: str | None = "", instruction: str | None = None,
         validate: Callable[[str], bool | str] | None = None) -> str:
    """Free text; ``default`` is pre-filled and accepted with Enter."""
    kwargs: dict[str, Any] = {"default": "" if default is None else str(default)}
    if instruction:
        kwargs["instruction"] = instruction
    if validate is not None:
        kwargs["validate"] = validate
    return questionary.text(message, **kwargs).unsafe_ask().strip()


def _number_check(parse: Callable[[str], Any], minimum: float | None, allow_empty: bool, what: str):
    def check(answer: str) -> bool | str:
        answer = answer.strip()
        if not answer:
            return True if allow_empty else f"Enter {what}."
        try:
            number = parse(answer)
        except ValueError:
            return f"{answer!r} is not {what}."
        if minimum is not None and number < minimum:
            return f"Enter a value of at least {minimum:g}."
        return True

    return check


def _parse_whole(answer: str) -> int:
    number = float(answer)
    if not number.is_integer():
        raise ValueError(answer)
    return int(number)


def integer(message: str, default: int | None, minimum: int | None = 0, allow_empty: bool = False,
            instruction: str | None = None) -> int | None:
    """A whole number (``1e3`` is accepted); empty gives None when ``allow_empty``."""
    answer = text(message, "" if default is None else str(default), instruction,
                  _number_check(_parse_whole, minimum, allow_empty, "a whole number"))
    return _parse_whole(answer) if answer else None


def _format_float(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def number(message: str, default: float | None, minimum: float | None = None, instruction: str | None = None) -> float:
    answer = text(message, _format_float(default), instruction, _number_check(float, minimum, False, "a number"))
    return float(answer)
