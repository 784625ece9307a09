"""model_family names -> classes, the legacy rule, and the registry's cheap import."""

import subprocess
import sys

import pytest

from simpletuner.config.settings import Settings
from simpletuner.models import registry
from simpletuner.models.base import ModelFamily


def test_known_families_resolve_to_their_classes():
    for name in ("sd1x", "sd2x", "sdxl"):
        family = registry.get_family(name)
        assert issubclass(family, ModelFamily) and family.name == name
        assert registry.FAMILIES[name] is family


def test_legacy_is_sd2x_only_for_sd2x_flavours():
    assert registry.get_family("legacy").name == "sd1x"
    assert registry.get_family("legacy", "1.5").name == "sd1x"
    assert registry.get_family("legacy", "2.1").name == "sd2x"
    assert registry.get_family("legacy", "2.1-base").name == "sd2x"
    assert "legacy" in registry.known_families()
    settings = Settings({"model_family": "legacy", "model_flavour": "2.0"})
    assert registry.get_family("legacy", settings).name == "sd2x"


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(registry.UnknownFamilyError) as error:
        registry.get_family("sd9")
    assert isinstance(error.value, KeyError)
    message = str(error.value)
    assert message.startswith("model_family='sd9'")
    assert "'sd9'" in message and "sdxl" in message and "sd1x" in message


def test_register_refuses_a_second_class_with_the_same_name():
    sdxl = registry.get_family("sdxl")
    impostor = type("Impostor", (ModelFamily,), {"name": "sdxl"})
    with pytest.raises(ValueError, match="already registered"):
        registry.register(impostor)
    assert registry.register(sdxl) is sdxl  # registering the same class again is harmless
    assert registry.FAMILIES["sdxl"] is sdxl


def test_register_needs_a_name():
    with pytest.raises(TypeError, match="name"):
        registry.register(type("Nameless", (ModelFamily,), {}))


def test_importing_the_registry_imports_no_torch_and_families_no_diffusers():
    code = (
        "import sys\n"
        "from simpletuner.models import registry\n"
        "assert 'torch' not in sys.modules, 'registry imported torch'\n"
        "registry.get_family('sdxl').check_settings\n"
        "assert 'diffusers' not in sys.modules, 'family module imported diffusers'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
