from pathlib import Path

from simpletuner.data.dataset_spec import KEYS

DOC = Path(__file__).resolve().parents[2] / "documentation" / "DATALOADER.md"


def test_every_dataset_key_is_documented():
    text = DOC.read_text(encoding="utf-8")
    missing = [key for key in KEYS if f"`{key}`" not in text]
    assert not missing, f"documentation/DATALOADER.md does not mention: {missing}"
