from simpletuner.config.docs import OUTPUT, render
from simpletuner.config.options import OPTIONS


def test_options_doc_is_current_and_lists_every_option():
    text = OUTPUT.read_text(encoding="utf-8")
    assert text == render(), "documentation/OPTIONS.md is stale: run `python -m simpletuner.config.docs`"
    for name in OPTIONS:
        assert f"`--{name}`" in text
