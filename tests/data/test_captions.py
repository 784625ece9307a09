"""Caption strategies, caption filters, shuffling and instance prompts."""

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from simpletuner.data.captions import (CaptionFilter, CaptionSource, MissingCaption, caption_from_filename,
                                       shuffled_variants)
from simpletuner.data.dataset_config import DatasetConfigError
from simpletuner.data.dataset_spec import DatasetSpec
from simpletuner.data.storage.local import LocalStorage

REFERENCE = Path(__file__).parents[2].parent / "shared" / "reference"


def source(tmp_path, **values) -> CaptionSource:
    spec = DatasetSpec(id="captions", instance_data_dir=str(tmp_path), **values)
    return CaptionSource(spec, LocalStorage(str(tmp_path)))


@pytest.mark.parametrize("path, caption", [
    ("a_photo_of_a_cat.png", "a photo of a cat"),
    ("a_photo_of_a_cat (3).png", "a photo of a cat"),
    ("sunset over hills - 2.jpg", "sunset over hills"),
    ("sub/folder/my_dog.jpeg", "my dog"),
    ("area 51.png", "area 51"),
    ("double__underscore.v2.webp", "double underscore.v2"),
])
def test_filename_strategy_cleans_up_the_name(path, caption):
    assert caption_from_filename(path) == caption


def test_filename_is_the_default_strategy(tmp_path):
    assert source(tmp_path).captions_for("red_apple (2).png") == ("red apple",)


def test_textfile_gives_one_caption_per_line(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "img.txt").write_text("first caption\n\n  second caption  \n", encoding="utf-8")
    assert source(tmp_path, caption_strategy="textfile").captions_for("sub/img.png") == (
        "first caption", "second caption")
    single = source(tmp_path, caption_strategy="textfile", disable_multiline_split=True)
    assert single.captions_for("sub/img.png") == ("first caption\n\n  second caption",)


def test_textfile_missing_or_empty_is_a_rejection(tmp_path):
    captions = source(tmp_path, caption_strategy="textfile")
    with pytest.raises(MissingCaption, match=r"no caption: .*nothing\.txt does not exist"):
        captions.captions_for("nothing.png")
    (tmp_path / "blank.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(MissingCaption, match="empty caption"):
        captions.captions_for("blank.png")


def test_textfile_with_bom_is_read(tmp_path):
    (tmp_path / "img.txt").write_bytes("\ufeffcaf\u00e9 scene".encode("utf-8"))
    assert source(tmp_path, caption_strategy="textfile").captions_for("img.jpg") == ("caf\u00e9 scene",)


def test_instance_prompt_strategy(tmp_path):
    captions = source(tmp_path, caption_strategy="instanceprompt", instance_prompt="sks dog")
    assert captions.captions_for("whatever_name.png") == ("sks dog",)


def test_prepend_and_only_instance_prompt(tmp_path):
    (tmp_path / "img.txt").write_text("on a beach", encoding="utf-8")
    prepended = source(tmp_path, caption_strategy="textfile", instance_prompt="sks dog", prepend_instance_prompt=True)
    assert prepended.captions_for("img.png") == ("sks dog on a beach",)
    only = source(tmp_path, caption_strategy="textfile", instance_prompt="sks dog", only_instance_prompt=True)
    assert only.captions_for("missing_caption_file.png") == ("sks dog",)


def test_parquet_strategy(tmp_path, caplog):
    table = pd.DataFrame({
        "id": [1, 2, 3],
        "cogvlm_caption": ["a red car", None, ""],
        "tags": ["car", "two dogs", "tree"],
    })
    table.to_parquet(tmp_path / "meta.parquet")
    captions = source(tmp_path, caption_strategy="parquet",
                      parquet={"path": "meta.parquet", "filename_column": "id", "caption_column": "cogvlm_caption",
                               "fallback_caption_column": "tags"})
    assert captions.captions_for("1.png") == ("a red car",)
    assert captions.captions_for("2.png") == ("two dogs",)  # empty primary -> fallback column
    assert captions.captions_for("3.jpg") == ("tree",)
    with caplog.at_level(logging.ERROR, logger="simpletuner.data"):
        assert captions.captions_for("not_in_table.png") == ("not in table",)
    assert "not_in_table.png is not in the parquet table" in caplog.text


def test_parquet_list_column_and_extension_in_identifier(tmp_path):
    table = pd.DataFrame({"filename": ["a.png", "b.jpg"], "caption": [["one", "two"], ["three"]]})
    table.to_parquet(tmp_path / "captions.parquet")
    captions = source(tmp_path, caption_strategy="parquet",
                      parquet={"path": str(tmp_path / "captions.parquet"), "filename_column": "filename",
                               "caption_column": "caption", "identifier_includes_extension": True})
    assert captions.captions_for("a.png") == ("one", "two")
    assert captions.captions_for("b.jpg") == ("three",)


def test_jsonl_table_and_bad_column(tmp_path):
    rows = [{"id": "x", "caption": "from json lines"}]
    (tmp_path / "meta.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    captions = source(tmp_path, caption_strategy="parquet", parquet={"path": "meta.jsonl", "filename_column": "id",
                                                                   "caption_column": "caption"})
    assert captions.captions_for("x.png") == ("from json lines",)
    with pytest.raises(DatasetConfigError, match="dataset 'captions': parquet: column 'text' is not in meta.jsonl"):
        source(tmp_path, caption_strategy="parquet", parquet={"path": "meta.jsonl", "filename_column": "id",
                                                              "caption_column": "text"})


def test_caption_filter_list_reference_example():
    rules = CaptionFilter(["arafed ", "this .* has a", "^this is the beginning of the string",
                           "s/this/will be found and replaced/"])
    assert rules.apply("arafed man walking") == "man walking"
    assert rules.apply("a dog, this photo has a red ball") == "a dog, red ball"
    assert rules.apply("this is the beginning of the string and more") == "and more"
    assert rules.apply("see this and this") == "see will be found and replaced and this"


def test_caption_filter_treats_invalid_regex_literally():
    assert CaptionFilter(["(unbalanced"]).apply("text (unbalanced here") == "text here"


def test_caption_filter_files(tmp_path):
    (tmp_path / "filters.txt").write_text("^there is \nblurry\n", encoding="utf-8")
    (tmp_path / "filters.json").write_text(json.dumps(["blurry", "s/cat/dog/"]), encoding="utf-8")
    assert CaptionFilter.from_setting(str(tmp_path / "filters.txt")).apply("there is a blurry cat") == "a cat"
    assert CaptionFilter.from_setting(str(tmp_path / "filters.json")).apply("a blurry cat") == "a dog"


def test_reference_caption_filter_file_loads():
    example = REFERENCE / "examples" / "caption_filter_list.txt.example"
    if not example.is_file():
        pytest.skip(f"reference example not found at {example}")
    rules = CaptionFilter.from_setting(str(example))
    assert rules.apply("The image showcases a mountain lake") == "a mountain lake"


def test_filter_applies_before_prepend(tmp_path):
    (tmp_path / "img.txt").write_text("arafed woman smiling", encoding="utf-8")
    captions = source(tmp_path, caption_strategy="textfile", caption_filter_list=("arafed ",),
                      instance_prompt="ohwx", prepend_instance_prompt=True)
    assert captions.captions_for("img.png") == ("ohwx woman smiling",)


def test_caption_shuffle_reference_example():
    options = {"enable": True, "count": 2, "seed": 42, "split_on": "comma", "position_start": 1,
               "include_original": True}
    variants = shuffled_variants("dog, running, park, sunny day", options, default_seed=0)
    assert variants[0] == "dog, running, park, sunny day"
    assert 2 <= len(variants) <= 3
    for variant in variants:
        tags = variant.split(", ")
        assert tags[0] == "dog" and sorted(tags) == sorted(["dog", "running", "park", "sunny day"])
    assert variants == shuffled_variants("dog, running, park, sunny day", options, default_seed=0)
    assert shuffled_variants("dog, cat", options, default_seed=0) == ("dog, cat",)  # too few tags to shuffle


def test_caption_shuffle_through_caption_source(tmp_path):
    (tmp_path / "img.txt").write_text("a, b, c, d, e", encoding="utf-8")
    captions = source(tmp_path, caption_strategy="textfile",
                      caption_shuffle={"enable": True, "count": 3, "include_original": False})
    result = captions.captions_for("img.png")
    assert "a, b, c, d, e" not in result and len(result) >= 1
