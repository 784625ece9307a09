"""Validation prompts (prompt, user library, built-in library, unconditional) and validation_resolution parsing."""

from __future__ import annotations

import json

import pytest

from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.validation.prompts import BUILTIN_PROMPT_LIBRARY, load_prompts, negative_prompt, slug
from simpletuner.validation.resolutions import parse_resolutions


def write_library(tmp_path, content) -> str:
    path = tmp_path / "user_prompt_library.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_no_prompt_means_no_renders():
    assert load_prompts(Settings({})) == []


def test_prompt_library_order_and_unconditional(tmp_path):
    library = write_library(tmp_path, {"castle": "a castle at dusk", "Old Dog!": "an old dog"})
    prompts = load_prompts(Settings({"validation_prompt": "a red circle", "user_prompt_library": library,
                                     "validation_prompt_library": True}))
    names = [p.shortname for p in prompts]
    assert names[:3] == ["validation", "castle", "Old Dog!"]
    assert names[3:-1] == list(BUILTIN_PROMPT_LIBRARY)
    assert prompts[-1].shortname == "unconditional" and prompts[-1].text == "" and prompts[-1].is_unconditional
    assert prompts[2].slug == "old_dog"


def test_unconditional_can_be_disabled():
    prompts = load_prompts(Settings({"validation_prompt": "x", "validation_disable_unconditional": True}))
    assert [p.shortname for p in prompts] == ["validation"]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON at line 1"),
    ([], "expected a non-empty JSON object"),
    ({"a": ""}, "entry 'a' must be a non-empty prompt string"),
    ({"a": {"prompt": "x"}}, "entry 'a' must be a non-empty prompt string"),
    ({"validation": "clashes with validation_prompt"}, "already used by validation_prompt"),
    ({"unconditional": "reserved"}, "reserved for the empty-prompt render"),
])
def test_bad_user_prompt_libraries_name_the_file_and_problem(tmp_path, content, message):
    library = write_library(tmp_path, content)
    with pytest.raises(ConfigError, match=message) as raised:
        load_prompts(Settings({"validation_prompt": "x", "user_prompt_library": library}))
    assert raised.value.key == "user_prompt_library"


def test_missing_user_prompt_library(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_prompts(Settings({"user_prompt_library": str(tmp_path / "missing.json")}))


def test_negative_prompt_empty_string_means_none():
    assert negative_prompt(Settings({})) == "blurry, cropped, ugly"
    assert negative_prompt(Settings({"validation_negative_prompt": ""})) is None


def test_slug_is_file_safe():
    assert slug("  A/B c.d ") == "a_b_c_d"
    assert slug("???") == "prompt"


@pytest.mark.parametrize("value, expected", [
    ("256", [(256, 256)]),
    (512, [(512, 512)]),
    ("1216x832, 1024", [(1216, 832), (1024, 1024)]),
    ("1.0", [(1024, 1024)]),
    ("0.25", [(512, 512)]),
    ("64,64", [(64, 64)]),
])
def test_parse_resolutions(value, expected):
    assert parse_resolutions(value) == expected


@pytest.mark.parametrize("value, message", [
    ("", "empty"),
    ("big", "'big' is not a number"),
    ("250", "multiples of 8; e.g. use 248x248"),
    ("64x-8", "must be positive"),
    ("64.5x64", "not a whole number"),
])
def test_bad_resolutions(value, message):
    with pytest.raises(ConfigError, match=message) as raised:
        parse_resolutions(value)
    assert raised.value.key == "validation_resolution"
