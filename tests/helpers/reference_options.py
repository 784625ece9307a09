"""Reads option names and choices out of the reference OPTIONS.md, for tests that compare against it."""

from __future__ import annotations

import re
from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "reference"
OPTIONS_MD = REFERENCE_DIR / "OPTIONS.md"
# Words written as `--word` in the prose that are not options of train.py.
NOT_OPTIONS = {"arguments", "encoder", "gt", "reg", "multi_gpu"}


def usage_block() -> str:
    text = OPTIONS_MD.read_text(encoding="utf-8")
    start = text.index("usage: train.py")
    return text[start:text.index("```", start)]


def listing_options() -> dict[str, list[str] | None]:
    """name -> choices (or None) from the usage listing's `options:` block."""
    _, described = usage_block().split("\noptions:")
    found: dict[str, list[str] | None] = {}
    for match in re.finditer(r"^  --([a-z0-9_]+)(.*)$", described, re.M):
        choices = re.match(r"\s*\{([^}]*)\}", match.group(2))
        found.setdefault(match.group(1), choices.group(1).split(",") if choices else None)
    return found


def prose_options() -> set[str]:
    text = OPTIONS_MD.read_text(encoding="utf-8")
    prose = text[:text.index("usage: train.py")]
    return set(re.findall(r"`--([a-z0-9_]+)", prose)) - NOT_OPTIONS
