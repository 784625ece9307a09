"""Every option and choice the reference names parses, appears in --help, and bad values are refused."""

from __future__ import annotations

import pytest

from simpletuner.cli.common import build_help_parser
from simpletuner.config.errors import ConfigErrors
from simpletuner.config.loader import load_config
from simpletuner.config.options import OPTIONS, canonical_name

from helpers.reference_options import OPTIONS_MD, listing_options, prose_options

pytestmark = pytest.mark.skipif(not OPTIONS_MD.exists(), reason="reference OPTIONS.md not found beside the repo")
CMD_ONLY = {"CONFIG_BACKEND": "cmd"}


def resolve(*argv: str):
    return load_config(list(argv), environ=CMD_ONLY, cwd="/nonexistent").settings


def test_every_reference_option_is_in_the_table():
    names = set(listing_options()) | prose_options()
    missing = sorted(n for n in names if canonical_name(n) is None)
    assert not missing, f"options named by the reference but unknown here: {missing}"
    assert len(names) >= 359


def test_every_option_appears_in_help():
    text = build_help_parser("simpletuner train", "").format_help()
    for name in set(listing_options()) | prose_options():
        assert f"--{name}" in text, name


def test_listing_choices_match_and_parse():
    for name, choices in listing_options().items():
        if not choices:
            continue
        option = OPTIONS[canonical_name(name)]
        assert [str(c) for c in option.choices][: len(choices)] == choices, name
        for choice in choices:
            assert str(getattr(resolve(f"--{name}={choice}"), option.name)) == choice


def test_model_family_accepts_legacy():
    assert resolve("--model_family=legacy").model_family == "legacy"


@pytest.mark.parametrize("name", ["model_family", "optimizer", "lr_scheduler", "mixed_precision"])
def test_value_outside_choices_is_refused_naming_the_key(name):
    with pytest.raises(ConfigErrors) as caught:
        resolve(f"--{name}=definitely-not-a-choice")
    assert caught.value.errors[0].key == name
    assert "definitely-not-a-choice" in str(caught.value)


def test_every_listed_flag_parses_bare_and_with_words():
    for name in listing_options():
        option = OPTIONS[canonical_name(name)]
        if option.kind != "bool":
            continue
        assert getattr(resolve(f"--{name}"), option.name) is True
        for word, expected in (("true", True), ("0", False), ("yes", True), ("no", False)):
            assert getattr(resolve(f"--{name}={word}"), option.name) is expected


def test_aliases_from_the_reference():
    assert resolve("--checkpointing_steps=25").checkpoint_step_interval == 25
    assert resolve("--validation_steps=10").validation_step_interval == 10
