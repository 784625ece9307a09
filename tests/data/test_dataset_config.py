"""multidatabackend.json parsing: reference examples, fallbacks, and error messages."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from simpletuner.config.options import OPTIONS
from simpletuner.config.settings import Settings
from simpletuner.data.dataset_config import (IMPLICIT_TEXT_EMBEDS_ID, DatasetConfigError, default_text_embeds,
                                             load_dataset_config, training_datasets)
from simpletuner.data.dataset_spec import KEY_ALIASES, KEYS, DatasetSpec

REFERENCE = Path(__file__).parents[2].parent / "shared" / "reference"
EXAMPLES = REFERENCE / "examples"
PATH_VALUE_KEYS = ("instance_data_dir", "cache_dir_vae", "cache_dir")


def settings(**values) -> Settings:
    known = {k: v for k, v in values.items() if k in OPTIONS}
    return Settings(known)


def write(tmp_path, entries, name="multidatabackend.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(entries), encoding="utf-8")
    return str(path)


def image_entry(tmp_path, **values) -> dict:
    data = tmp_path / "images"
    data.mkdir(exist_ok=True)
    return {"id": "photos", "type": "local", "instance_data_dir": str(data), **values}


def load_error(tmp_path, entries, **settings_values) -> str:
    with pytest.raises(DatasetConfigError) as caught:
        load_dataset_config(write(tmp_path, entries), settings(**settings_values))
    return str(caught.value)


def relocate(entries: list, root: Path) -> list:
    """Point every path of an example at folders under root, and fill in {model_family}."""
    moved = []
    for number, entry in enumerate(entries):
        entry = dict(entry)
        for key in PATH_VALUE_KEYS:
            if isinstance(entry.get(key), str) and entry[key]:
                folder = root / f"{key}-{number}"
                folder.mkdir(parents=True, exist_ok=True)
                entry[key] = str(folder)
        moved.append(entry)
    return moved


def example_files():
    if not EXAMPLES.is_dir():
        return []
    return sorted(p for p in EXAMPLES.iterdir() if p.name.startswith("multidatabackend"))


def needs_reference():
    if not EXAMPLES.is_dir():
        pytest.skip(f"reference examples not found at {EXAMPLES}")


def test_spec_has_one_attribute_per_documented_key():
    fields = {f.name for f in dataclasses.fields(DatasetSpec)}
    assert set(KEYS) <= fields
    assert not set(KEY_ALIASES) & fields


@pytest.mark.parametrize("example", example_files(), ids=lambda p: p.name)
def test_reference_examples(example, tmp_path):
    """Local/aws examples parse once their paths exist; the Hugging Face / video ones say what is not built yet."""
    entries = relocate(json.loads(example.read_text(encoding="utf-8")), tmp_path)
    uses_unbuilt = any(e.get("type") == "huggingface" or e.get("dataset_type") == "video" for e in entries)
    placeholders = [(e["id"], k) for e in entries for k, v in e.items() if isinstance(v, str) and "|" in v]
    path = write(tmp_path, entries)
    if uses_unbuilt:
        with pytest.raises(DatasetConfigError, match="type is not implemented yet for the value 'huggingface'"):
            load_dataset_config(path, settings())
        return
    if placeholders:
        with pytest.raises(DatasetConfigError) as caught:
            load_dataset_config(path, settings())
        for dataset_id, key in placeholders:
            assert re.search(rf"dataset '{re.escape(dataset_id)}': {key}: .*lists several choices", str(caught.value))
        entries = [{k: (v.split("|")[0] if isinstance(v, str) and "|" in v else v) for k, v in e.items()}
                   for e in entries]
        path = write(tmp_path, entries)
    specs = load_dataset_config(path, settings())
    assert [s.id for s in specs][:len(entries)] == [e["id"] for e in entries]
    assert sum(1 for s in specs if s.dataset_type == "text_embeds" and s.default) == 1


def test_dataloader_doc_first_example_parses(tmp_path):
    needs_reference()
    text = (REFERENCE / "DATALOADER.md").read_text(encoding="utf-8")
    block = re.search(r"```json\n(\[.*?\])\n```", text, re.S).group(1)
    specs = load_dataset_config(write(tmp_path, relocate(json.loads(block), tmp_path)), settings())
    image, text_embeds = specs
    assert (image.crop, image.crop_style, image.crop_aspect, image.resolution_type) == (True, "center", "square",
                                                                                          "pixel_area")
    assert (image.minimum_aspect_ratio, image.maximum_aspect_ratio) == (0.5, 3.0)
    assert text_embeds.type == "aws" and text_embeds.default
    assert image.text_embeds == text_embeds.id


def test_unknown_key_names_dataset_key_and_suggestion(tmp_path):
    message = load_error(tmp_path, [image_entry(tmp_path, resolutoin=512)])
    assert "dataset 'photos': resolutoin: unknown key (did you mean 'resolution'?)" in message
    assert str(tmp_path / "multidatabackend.json") in message


@pytest.mark.parametrize("key, value, expected", [
    ("crop", "maybe", "crop: expected true or false"),
    ("repeats", -1, "repeats: must be at least 0"),
    ("repeats", 1.5, "repeats: expected a whole number"),
    ("resolution_type", "pixels", "resolution_type: 'pixels' is not one of: pixel, area, pixel_area"),
    ("crop_aspect_buckets", [1.0, "wide"], "crop_aspect_buckets: expected a number"),
    ("max_upscale_threshold", 3, "max_upscale_threshold: must be at most 1"),
    ("caption_strategy", "filename|textfile", "caption_strategy: 'filename|textfile' lists several choices"),
])
def test_bad_values_name_dataset_and_key(tmp_path, key, value, expected):
    message = load_error(tmp_path, [image_entry(tmp_path, **{key: value})])
    assert f"dataset 'photos': {expected}" in message


def test_all_problems_are_reported_together(tmp_path):
    message = load_error(tmp_path, [image_entry(tmp_path, crop="x", probability="high", colour=1)])
    assert len(message.splitlines()) == 3


def test_duplicate_ids(tmp_path):
    entry = image_entry(tmp_path)
    assert "dataset 'photos': id: is used by more than one dataset" in load_error(tmp_path, [entry, entry])


def test_missing_or_absent_instance_data_dir(tmp_path):
    message = load_error(tmp_path, [{"id": "photos", "type": "local"}])
    assert "dataset 'photos': instance_data_dir: is required for a local image dataset" in message
    message = load_error(tmp_path, [{"id": "photos", "type": "local", "instance_data_dir": str(tmp_path / "no")}])
    assert "instance_data_dir: folder" in message and "does not exist" in message


def test_an_enabled_image_dataset_is_required(tmp_path):
    entries = [image_entry(tmp_path, disabled=True),
               {"id": "te", "type": "local", "dataset_type": "text_embeds", "cache_dir": str(tmp_path)}]
    assert "no enabled image dataset" in load_error(tmp_path, entries)


def test_missing_id_and_non_object(tmp_path):
    message = load_error(tmp_path, [{"type": "local"}, "text"])
    assert "entry #1: id: every dataset needs" in message
    assert "entry #2: each dataset must be a JSON object" in message


def test_json_syntax_error_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"id": "a",\n }\n]', encoding="utf-8")
    with pytest.raises(DatasetConfigError, match=r"broken.json: not valid JSON at line 3"):
        load_dataset_config(str(path), settings())


def test_implicit_text_embeds_dataset(tmp_path):
    specs = load_dataset_config(write(tmp_path, [image_entry(tmp_path)]), settings(cache_dir_text=str(tmp_path / "t")))
    implicit = default_text_embeds(specs)
    assert implicit.id == IMPLICIT_TEXT_EMBEDS_ID and implicit.implicit and implicit.type == "local"
    assert implicit.cache_dir == str(tmp_path / "t")
    assert training_datasets(specs)[0].text_embeds == IMPLICIT_TEXT_EMBEDS_ID


def test_single_text_embeds_becomes_default_and_links(tmp_path):
    entries = [image_entry(tmp_path), {"id": "te", "type": "local", "dataset_type": "text_embeds",
                                       "cache_dir": str(tmp_path / "te")}]
    specs = load_dataset_config(write(tmp_path, entries), settings())
    assert default_text_embeds(specs).id == "te"
    assert specs[0].text_embeds == "te"


def test_text_embeds_rules(tmp_path):
    te = {"type": "local", "dataset_type": "text_embeds", "cache_dir": str(tmp_path / "te")}
    two_defaults = [image_entry(tmp_path), {"id": "a", "default": True, **te}, {"id": "b", "default": True, **te}]
    assert "only one text_embeds dataset may be the default" in load_error(tmp_path, two_defaults)
    no_default = [image_entry(tmp_path), {"id": "a", **te}, {"id": "b", **te}]
    assert "none is the default" in load_error(tmp_path, no_default)
    bad_link = [image_entry(tmp_path, text_embeds="nope"), {"id": "a", **te}]
    assert "dataset 'photos': text_embeds: no dataset has the id 'nope'" in load_error(tmp_path, bad_link)


def test_aliases_and_spellings(tmp_path):
    entries = [image_entry(tmp_path, caption_strategy="instance_prompt", instance_prompt="sks",
                           is_regularization_data=True, crop_style="centre"),
               image_entry(tmp_path, id="off", disable=True)]
    photos, off = load_dataset_config(write(tmp_path, entries), settings())[:2]
    assert photos.caption_strategy == "instanceprompt" and photos.is_regularisation_data
    assert photos.crop_style == "center"
    assert off.disabled and training_datasets([photos, off]) == [photos]


def test_instance_prompt_required(tmp_path):
    message = load_error(tmp_path, [image_entry(tmp_path, caption_strategy="instanceprompt")])
    assert "dataset 'photos': instance_prompt: is required by caption_strategy \"instanceprompt\"" in message


@pytest.mark.parametrize("values, key", [
    ({"dataset_type": "video"}, "dataset_type"),
    ({"crop_style": "face"}, "crop_style"),
    ({"metadata_backend": "parquet"}, "metadata_backend"),
    ({"caption_strategy": "huggingface"}, "caption_strategy"),
    ({"conditioning": {"type": "canny"}}, "conditioning"),
    ({"slider_strength": 0.5}, "slider_strength"),
])
def test_unbuilt_features_are_refused(tmp_path, values, key):
    message = load_error(tmp_path, [image_entry(tmp_path, **values)])
    assert f"dataset 'photos': {key} is not implemented yet" in message


def test_unbuilt_feature_in_disabled_dataset_is_ignored(tmp_path):
    entries = [image_entry(tmp_path), {"id": "hf", "type": "huggingface", "dataset_name": "x/y", "disabled": True}]
    specs = load_dataset_config(write(tmp_path, entries), settings())
    assert [s.id for s in specs if s.disabled] == ["hf"]


def test_area_resolution_in_pixels_is_caught(tmp_path):
    message = load_error(tmp_path, [image_entry(tmp_path, resolution=1024, resolution_type="area")])
    assert "resolution: 1024 megapixels is far too large" in message and "pixel_area" in message
    message = load_error(tmp_path, [image_entry(tmp_path, resolution=1.0, resolution_type="pixel_area")])
    assert "use resolution_type \"area\"" in message


def test_random_crop_aspect_needs_buckets(tmp_path):
    message = load_error(tmp_path, [image_entry(tmp_path, crop=True, crop_aspect="random")])
    assert "dataset 'photos': crop_aspect_buckets: crop_aspect \"random\" needs a list" in message


def test_skip_file_discovery_stages(tmp_path):
    specs = load_dataset_config(write(tmp_path, [image_entry(tmp_path, skip_file_discovery="vae, aspect")]),
                                settings(skip_file_discovery="text"))
    assert specs[0].skip_file_discovery == ("aspect", "text", "vae")
    message = load_error(tmp_path, [image_entry(tmp_path, skip_file_discovery="aspects")])
    assert "skip_file_discovery: unknown stage(s) aspects" in message


def test_fallbacks_from_global_settings(tmp_path):
    specs = load_dataset_config(write(tmp_path, [image_entry(tmp_path, crop=True, crop_style="random")]),
                                settings(minimum_image_size=300, prepend_instance_prompt=False,
                                         delete_unwanted_images=True, aspect_bucket_alignment=16,
                                         cache_dir_vae=str(tmp_path / "vae")))
    photos = specs[0]
    assert photos.minimum_image_size == 300
    assert photos.delete_unwanted_images is True
    assert photos.aspect_bucket_alignment == 16
    assert photos.cache_dir_vae == str(tmp_path / "vae" / "photos")
    assert photos.vae_cache_clear_each_epoch is True  # random crops: on by default, as the reference says
    assert photos.resolution == getattr(settings(), "resolution", 1024)
    assert "repeats" not in photos.explicit_keys and "crop" in photos.explicit_keys


def test_dataset_value_beats_global_setting(tmp_path):
    specs = load_dataset_config(write(tmp_path, [image_entry(tmp_path, minimum_image_size=64,
                                                             vae_cache_clear_each_epoch=False)]),
                                settings(minimum_image_size=300))
    assert specs[0].minimum_image_size == 64 and specs[0].vae_cache_clear_each_epoch is False


def test_resolution_fallback_when_option_exists(tmp_path):
    if "resolution" not in OPTIONS or "resolution_type" not in OPTIONS:
        pytest.skip("the resolution options are not in the option table yet")
    specs = load_dataset_config(write(tmp_path, [image_entry(tmp_path)]),
                                settings(resolution=512, resolution_type="pixel"))
    assert (specs[0].resolution, specs[0].resolution_type) == (512, "pixel")


def test_model_family_placeholder(tmp_path):
    entry = image_entry(tmp_path, cache_dir_vae=str(tmp_path / "cache" / "{model_family}" / "vae"))
    assert "cache_dir_vae uses {model_family} but --model_family is not set" in load_error(tmp_path, [entry])
    if "model_family" not in OPTIONS:
        pytest.skip("model_family is not in the option table yet")
    specs = load_dataset_config(write(tmp_path, [entry]), settings(model_family="sdxl"))
    assert specs[0].cache_dir_vae == str(tmp_path / "cache" / "sdxl" / "vae")


def test_caption_filter_list_file_must_exist(tmp_path):
    message = load_error(tmp_path, [image_entry(tmp_path, caption_filter_list=str(tmp_path / "none.txt"))])
    assert "caption_filter_list: file" in message and "not found" in message
