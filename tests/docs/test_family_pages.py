from simpletuner.models.docs import OUTPUT_DIR, pages


def test_every_available_family_has_a_current_page():
    for filename, text in pages().items():
        path = OUTPUT_DIR / filename
        assert path.exists() and path.read_text(encoding="utf-8") == text, \
            f"{path} is missing or stale: run `python -m simpletuner.models.docs`"
