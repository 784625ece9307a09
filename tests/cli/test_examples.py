"""The shipped presets: listed, copied, and each accepted by `simpletuner check` on the tiny model."""

from __future__ import annotations

import json
import os

import pytest

from helpers.images import copy_sample_images

from simpletuner.cli import main as cli_main
from simpletuner.config.loader import EXAMPLES_DIR, example_names
from simpletuner.models.tiny import SUPPORTED_FAMILIES


def test_list_shows_every_preset(capsys):
    assert cli_main(["examples", "list"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == example_names()
    assert {"demo", "sdxl.peft-lora", "sdxl.lycoris-lokr", "sd1x.peft-lora"} <= set(listed)


def test_copy_points_companion_files_at_the_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["examples", "copy", "sdxl.peft-lora"]) == 0
    config = json.loads((tmp_path / "config" / "sdxl.peft-lora" / "config.json").read_text())
    assert config["data_backend_config"] == os.path.join("config", "sdxl.peft-lora", "multidatabackend.json")
    assert cli_main(["examples", "copy", "sdxl.peft-lora"]) == 2  # never overwrites
    assert cli_main(["examples", "copy", "no-such-preset"]) == 2


def _family_of(name: str) -> str:
    folder = EXAMPLES_DIR / name
    return json.loads((folder / "config.json").read_text())["model_family"]


@pytest.mark.parametrize("name", example_names())
def test_each_preset_passes_check_on_the_tiny_model(name, tiny_model, sample_images, tmp_path, monkeypatch, capsys):
    family = _family_of(name)
    if family not in SUPPORTED_FAMILIES:
        pytest.skip(f"no tiny {family} model to point the preset at")
    model = tiny_model(family)
    # each preset gets its own copy: the bucket index saved beside the images records the preset's crop options
    images = copy_sample_images(sample_images, tmp_path / "images")
    datasets = json.loads((EXAMPLES_DIR / name / "multidatabackend.json").read_text())
    for dataset in datasets:
        if dataset.get("dataset_type", "image") == "image":
            dataset.update(instance_data_dir=str(images), resolution=64, resolution_type="pixel",
                           minimum_image_size=32, caption_strategy="textfile")
        for key in ("cache_dir", "cache_dir_vae"):
            if key in dataset:
                dataset[key] = str(tmp_path / "cache" / dataset["id"])
    dataset_file = tmp_path / "datasets.json"
    dataset_file.write_text(json.dumps(datasets))
    monkeypatch.chdir(tmp_path)
    code = cli_main(["check", f"example={name}", f"--pretrained_model_name_or_path={model}",
                     f"--data_backend_config={dataset_file}", "--resolution=64", "--resolution_type=pixel",
                     "--train_batch_size=1"])
    assert code == 0, capsys.readouterr().err
