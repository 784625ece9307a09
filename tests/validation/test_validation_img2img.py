"""validation_using_datasets: image-to-image renders from dataset images, the input stitched beside them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from helpers.runs import base_config, train
from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.validation.checks import validation_errors
from simpletuner.validation.dataset_inputs import input_dataset_ids
from simpletuner.validation.images import with_input

CAPTION = "a plain test card"


def write_inputs(folder: Path) -> dict[str, np.ndarray]:
    """Two 64x64 images (already at the training size) with one caption: renders differ only by their input."""
    folder.mkdir(parents=True)
    pixels = {}
    for name, colour in (("warm", (230, 90, 30)), ("cool", (20, 90, 230))):
        array = np.zeros((64, 64, 3), dtype=np.uint8)
        array[:, :32] = colour
        array[:, 32:] = (255, 255, 255)
        Image.fromarray(array).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(CAPTION)
        pixels[name] = array.astype(np.int16)
    return pixels


def add_dataset(config: dict, dataset_id: str, images: Path, cache: Path, dataset_type: str = "eval") -> None:
    path = Path(config["data_backend_config"])
    datasets = json.loads(path.read_text())
    datasets.insert(1, {"id": dataset_id, "type": "local", "dataset_type": dataset_type,
                        "instance_data_dir": str(images), "caption_strategy": "textfile", "resolution": 64,
                        "resolution_type": "pixel", "minimum_image_size": 32, "crop": True, "crop_style": "center",
                        "crop_aspect": "square", "cache_dir_vae": str(cache)})
    path.write_text(json.dumps(datasets))


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from simpletuner.models.tiny import build_tiny

    return build_tiny("sdxl", str(tmp_path_factory.mktemp("models") / "sdxl"))


def test_renders_img2img_from_the_eval_dataset_with_the_input_on_the_left(sdxl_dir, tmp_path):
    from simpletuner.demo.sample_data import make_sample_images

    make_sample_images(str(tmp_path / "train"), count=2)
    inputs = write_inputs(tmp_path / "inputs")
    config = base_config("sdxl", sdxl_dir, tmp_path, tmp_path / "train", max_train_steps=2,
                         validation_prompt="a red circle", validation_step_interval=2, validation_resolution="96x64",
                         validation_num_inference_steps=4, validation_disable_unconditional=True,
                         validation_using_datasets=True, eval_dataset_id="cards", num_eval_images=2,
                         eval_loss_disable=True)
    add_dataset(config, "cards", tmp_path / "inputs", tmp_path / "cache" / "vae-cards")
    train(config)
    folder = tmp_path / "output" / "validation_images"
    assert sorted(os.listdir(folder)) == ["step000002_cards_cool_64x64_0.png", "step000002_cards_warm_64x64_0.png",
                                          "step000002_validation_96x64_0.png"]
    outputs = {}
    for name, source in inputs.items():
        with Image.open(folder / f"step000002_cards_{name}_64x64_0.png") as saved:
            row = np.asarray(saved.convert("RGB"), dtype=np.int16)
        assert row.shape == (64, 3 * 64, 3)  # input, base-model benchmark, trained weights
        assert np.array_equal(row[:, :64], source)
        outputs[name] = row[:, 128:]
    assert np.abs(outputs["warm"] - outputs["cool"]).max() > 10, "same caption, so only the input image differs"
    with Image.open(tmp_path / "output" / "benchmarks" / "base_cards_warm_64x64_0.png") as base:
        assert base.size == (64, 64)


def test_input_goes_on_the_named_side():
    render, benchmark, source = (Image.new("RGB", (8, 8), colour) for colour in ("red", "green", "blue"))
    assert with_input([benchmark, render], source, "left") == [source, benchmark, render]
    assert with_input([benchmark, render], source, "right") == [benchmark, render, source]
    assert with_input([render], None, "left") == [render]


def test_eval_dataset_id_must_name_an_image_or_eval_dataset():
    specs = {"photos": SimpleNamespace(dataset_type="image"), "held": SimpleNamespace(dataset_type="eval"),
             "text": SimpleNamespace(dataset_type="text_embeds")}
    assert input_dataset_ids(Settings({}), specs) == ["photos"]
    assert input_dataset_ids(Settings({"eval_dataset_id": "held"}), specs) == ["held"]
    with pytest.raises(ConfigError, match="choose one of: held, photos") as caught:
        input_dataset_ids(Settings({"eval_dataset_id": "text"}), specs)
    assert caught.value.key == "eval_dataset_id"


def test_families_without_img2img_and_too_few_steps_are_refused():
    sana = validation_errors(Settings({"model_family": "sana", "validation_using_datasets": True}))
    assert [error.key for error in sana] == ["validation_using_datasets"]
    assert "model_family=sana has no img2img pipeline" in str(sana[0])
    sdxl = validation_errors(Settings({"model_family": "sdxl", "validation_using_datasets": True,
                                       "validation_num_inference_steps": 2}))
    assert [error.key for error in sdxl] == ["validation_num_inference_steps"]
    assert "use at least 4" in str(sdxl[0])


def test_eval_dataset_id_also_picks_the_eval_dataset_scored_for_eval_loss():
    from simpletuner.validation.eval_loss import eval_specs

    specs = {name: SimpleNamespace(id=name, dataset_type=kind)
             for name, kind in (("photos", "image"), ("held", "eval"), ("other", "eval"))}
    assert [spec.id for spec in eval_specs(SimpleNamespace(specs=specs, settings=Settings({})))] == ["held", "other"]
    chosen = SimpleNamespace(specs=specs, settings=Settings({"eval_dataset_id": "other"}))
    assert [spec.id for spec in eval_specs(chosen)] == ["other"]
    inputs_only = SimpleNamespace(specs=specs, settings=Settings({"eval_dataset_id": "photos"}))
    assert [spec.id for spec in eval_specs(inputs_only)] == ["held", "other"]
