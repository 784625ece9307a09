"""Options that need hardware this machine lacks stop with a message naming the requirement."""

import pytest

from simpletuner.config import hardware
from simpletuner.config.options import OPTIONS
from simpletuner.config.settings import Settings
from simpletuner.config.validate import implementation_errors


@pytest.mark.parametrize("name", sorted(n for n, o in OPTIONS.items() if o.requires))
def test_option_requirement_is_named_when_unmet(name):
    option = OPTIONS[name]
    needs = hardware.unmet(option.requires)
    if needs is None:
        pytest.skip(f"this machine meets {option.requires}")
    value = {"bool": not option.default, "int": 7, "float": 0.5, "str": "x"}[option.kind]
    (error,) = implementation_errors(Settings({name: value}))
    assert error.key == name and needs in str(error)


def test_every_requirement_key_exists():
    for option in OPTIONS.values():
        for key in [option.requires, *option.gated_choices.values()]:
            assert key is None or key in hardware.REQUIREMENTS, (option.name, key)
