"""Discovery: bucketing a folder of images, rejections, the saved bucket index, and pixel loading."""

import dataclasses
import io
import json
import logging

import pytest
import torch
from PIL import Image

from simpletuner.config.settings import Settings
from simpletuner.data import discovery
from simpletuner.data.dataset_spec import DatasetSpec
from simpletuner.data.discovery import (DatasetIndexError, bucket_index_name, discover_dataset, replan_for_epoch,
                                        summarize)
from simpletuner.data.storage.local import LocalStorage
from simpletuner.data.transforms import load_image, load_pixels

MIXED = {"square.png": (1000, 1000), "landscape.png": (1460, 1000), "portrait.jpg": (1000, 1460)}


def save_image(folder, name, size, color=(200, 30, 30), caption=None):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def make_spec(folder, **values) -> DatasetSpec:
    return DatasetSpec(id="photos", instance_data_dir=str(folder), **values)


def run(folder, settings=None, **values):
    spec = make_spec(folder, **values)
    return discover_dataset(spec, LocalStorage(str(folder)), settings or Settings({}), progress=False)


@pytest.fixture
def mixed(tmp_path):
    for name, size in MIXED.items():
        save_image(tmp_path, name, size)
    return tmp_path


@pytest.mark.parametrize("resolution_type, resolution, expected", [
    ("pixel_area", 1024, {"square.png": (1024, 1024), "landscape.png": (1216, 832), "portrait.jpg": (832, 1216)}),
    ("pixel", 1024, {"square.png": (1024, 1024), "landscape.png": (1472, 1024), "portrait.jpg": (1024, 1536)}),
    ("area", 1.0, {"square.png": (1024, 1024), "landscape.png": (1216, 832), "portrait.jpg": (832, 1216)}),
])
def test_mixed_aspect_set_is_bucketed_per_resolution_type(mixed, resolution_type, resolution, expected):
    index = run(mixed, resolution=resolution, resolution_type=resolution_type)
    assert {r.path: r.target_size for r in index.records} == expected
    assert index.files_seen == 3 and not index.rejected
    assert sorted(index.buckets()) == sorted(f"{w}x{h}" for w, h in expected.values())


def test_records_carry_captions_and_sizes(mixed):
    save_image(mixed, "nested/dog_on_grass (2).png", (640, 640))
    index = run(mixed, resolution=512, is_regularisation_data=True)
    record = next(r for r in index.records if r.path == "nested/dog_on_grass (2).png")
    assert record.captions == ("dog on grass",)
    assert record.original_size == (640, 640) and record.is_regularisation
    assert record.source_stamp


def test_corrupt_small_and_uncaptioned_images_are_skipped_with_one_log_line(tmp_path, caplog):
    save_image(tmp_path, "good.png", (512, 512), caption="a good image")
    save_image(tmp_path, "small.png", (64, 64), caption="tiny")
    save_image(tmp_path, "nocaption.png", (512, 512))
    whole = io.BytesIO()
    Image.new("RGB", (512, 512), (1, 2, 3)).save(whole, format="PNG")
    (tmp_path / "truncated.png").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (tmp_path / "truncated.txt").write_text("broken", encoding="utf-8")
    (tmp_path / "notanimage.jpg").write_bytes(b"this is text, not a jpeg")
    with caplog.at_level(logging.WARNING, logger="simpletuner.data"):
        index = run(tmp_path, resolution=512, minimum_image_size=256, caption_strategy="textfile")
    assert [r.path for r in index.records] == ["good.png"]
    reasons = {r.path: r.reason for r in index.rejected}
    assert reasons["small.png"].startswith("too small:")
    assert reasons["truncated.png"].startswith("unreadable image:")
    assert reasons["notanimage.jpg"].startswith("unreadable image:")
    assert reasons["nocaption.png"].startswith("no caption:")
    for name in reasons:
        lines = [m for m in caplog.messages if f"{name}:" in m and "skipping" in m]
        assert len(lines) == 1, (name, caplog.messages)


def test_delete_unwanted_and_problematic_images(tmp_path):
    save_image(tmp_path, "good.png", (512, 512))
    save_image(tmp_path, "small.png", (64, 64))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    run(tmp_path, resolution=512, minimum_image_size=256)
    assert (tmp_path / "small.png").exists() and (tmp_path / "broken.png").exists()
    run(tmp_path, resolution=512, minimum_image_size=256, delete_unwanted_images=True,
        delete_problematic_images=True)
    assert not (tmp_path / "small.png").exists() and not (tmp_path / "broken.png").exists()
    saved = json.loads((tmp_path / bucket_index_name(make_spec(tmp_path))).read_text())
    assert sorted(saved["files"]) == ["good.png"]


def test_saved_index_is_reused_for_unchanged_files(mixed, monkeypatch):
    run(mixed, resolution=512)
    saved = json.loads((mixed / "aspect_ratio_bucket_indices_photos.json").read_text())
    assert saved["config"]["resolution"] == 512 and set(saved["files"]) == set(MIXED)
    probed = []
    real_probe = discovery.probe_image
    monkeypatch.setattr(discovery, "probe_image", lambda storage, path: probed.append(path) or real_probe(storage, path))
    first = run(mixed, resolution=512)
    assert probed == []
    save_image(mixed, "square.png", (1000, 500), color=(0, 0, 255))  # changed file
    save_image(mixed, "new.png", (700, 700))
    second = run(mixed, resolution=512)
    assert sorted(probed) == ["new.png", "square.png"]
    assert len(second.records) == len(first.records) + 1
    assert next(r for r in second.records if r.path == "square.png").original_size == (1000, 500)


def test_changed_crop_or_resolution_is_refused_unless_overridden(mixed):
    run(mixed, resolution=512, crop=False)
    with pytest.raises(DatasetIndexError) as caught:
        run(mixed, resolution=768, crop=True)
    message = str(caught.value)
    assert "dataset 'photos'" in message and "resolution: 512 -> 768" in message and "crop: False -> True" in message
    assert "--override_dataset_config" in message
    index = run(mixed, Settings({"override_dataset_config": True}), resolution=768, crop=True)
    assert {r.target_size for r in index.records} == {(768, 768)}
    assert run(mixed, resolution=768, crop=True).records == index.records  # rebuilt index now matches


def test_repeats_and_probability_do_not_invalidate_the_index(mixed):
    run(mixed, resolution=512, repeats=0)
    assert len(run(mixed, resolution=512, repeats=5, probability=0.5).records) == 3


def test_changed_filters_are_reapplied_without_reading_files(mixed, monkeypatch):
    run(mixed, resolution=512)
    monkeypatch.setattr(discovery, "probe_image", lambda storage, path: pytest.fail(f"{path} was read again"))
    index = run(mixed, resolution=512, maximum_aspect_ratio=1.2)
    assert sorted(r.path for r in index.records) == ["portrait.jpg", "square.png"]
    assert [r.path for r in index.rejected] == ["landscape.png"]
    assert len(run(mixed, resolution=512).records) == 3


def test_preserve_data_backend_cache_does_not_rescan(mixed):
    run(mixed, resolution=512)
    save_image(mixed, "added_later.png", (600, 600))
    assert len(run(mixed, resolution=512, preserve_data_backend_cache=True).records) == 3
    assert len(run(mixed, resolution=512, skip_file_discovery=("aspect",)).records) == 3
    assert len(run(mixed, resolution=512).records) == 4


def test_empty_dataset_explains_why(tmp_path):
    with pytest.raises(DatasetIndexError, match="no image files .* were found in"):
        run(tmp_path, resolution=512)
    save_image(tmp_path, "a.png", (50, 50))
    save_image(tmp_path, "b.png", (60, 60))
    (tmp_path / "c.png").write_bytes(b"nope")
    with pytest.raises(DatasetIndexError) as caught:
        run(tmp_path, resolution=512, minimum_image_size=256)
    message = str(caught.value)
    assert "none of the 3 image files" in message and "2 too small" in message and "1 unreadable image" in message


def test_summarize(tmp_path):
    for number in range(3):
        save_image(tmp_path, f"sq{number}.png", (600, 600))
    save_image(tmp_path, "wide.png", (900, 600))
    for number in range(7):
        save_image(tmp_path, f"tiny{number}.png", (40, 40))
    index = run(tmp_path, resolution=512, minimum_image_size=256)
    report = summarize(index)
    assert "11 image files found, 4 usable, 7 skipped" in report
    assert "512x512: 3" in report and "640x448: 1" in report
    assert "too small (7):" in report and "... and 2 more" in report


def test_max_num_samples_is_a_stable_subset(tmp_path):
    for number in range(10):
        save_image(tmp_path, f"img{number}.png", (300, 300))
    first = run(tmp_path, resolution=256, max_num_samples=4)
    assert len(first.records) == 4
    assert [r.path for r in run(tmp_path, resolution=256, max_num_samples=4).records] == [r.path for r in first.records]


def test_random_crops_are_reproducible_and_replanned_per_epoch(tmp_path):
    for number in range(6):
        save_image(tmp_path, f"img{number}.png", (900, 700))
    values = dict(resolution=256, resolution_type="pixel", crop=True, crop_style="random",
                  vae_cache_clear_each_epoch=True)
    spec = make_spec(tmp_path, **values)
    index = run(tmp_path, **values)
    assert [r.crop_offset for r in run(tmp_path, **values).records] == [r.crop_offset for r in index.records]
    same = replan_for_epoch(index, spec, Settings({}), epoch=1)
    assert same is index
    later = replan_for_epoch(index, spec, Settings({}), epoch=2)
    assert [r.crop_offset for r in later.records] != [r.crop_offset for r in index.records]
    assert [r.target_size for r in later.records] == [r.target_size for r in index.records]
    frozen = replan_for_epoch(index, spec, Settings({"aspect_bucket_disable_rebuild": True}), epoch=2)
    assert frozen is index


def test_load_pixels_applies_the_plan(tmp_path):
    image = Image.new("RGB", (400, 200), (255, 0, 0))
    image.paste((0, 0, 255), (200, 0, 400, 200))  # right half blue
    image.save(tmp_path / "halves.png")
    index = run(tmp_path, resolution=200, resolution_type="pixel", crop=True, crop_style="corner",
                aspect_bucket_alignment=8)
    record = index.records[0]
    assert record.target_size == (200, 200) and record.crop_offset == (0, 200)
    pixels = load_pixels(record, LocalStorage(str(tmp_path)))
    assert pixels.shape == (3, 200, 200) and pixels.dtype == torch.float32
    assert torch.allclose(pixels[:, 100, 100], torch.tensor([-1.0, -1.0, 1.0]))
    left = dataclasses.replace(record, crop_offset=(0, 0))
    assert torch.allclose(load_pixels(left, LocalStorage(str(tmp_path)))[:, 100, 100], torch.tensor([1.0, -1.0, -1.0]))


def test_load_pixels_resizes_to_the_intermediate_size(mixed):
    record = next(r for r in run(mixed, resolution=1024).records if r.path == "landscape.png")
    pixels = load_pixels(record, LocalStorage(str(mixed)))
    assert pixels.shape == (3, 832, 1216)
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_exif_rotation_is_respected(tmp_path):
    image = Image.new("RGB", (300, 200), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    index = run(tmp_path, resolution=128, resolution_type="pixel")
    assert index.records[0].original_size == (200, 300)
    assert load_image(LocalStorage(str(tmp_path)), "rotated.jpg").size == (200, 300)
    assert load_pixels(index.records[0], LocalStorage(str(tmp_path))).shape[1:] == (192, 128)


def test_transparent_image_becomes_rgb(tmp_path):
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    image = load_image(LocalStorage(str(tmp_path)), "clear.png")
    assert image.mode == "RGB" and image.getpixel((5, 5)) == (255, 255, 255)


def test_changed_file_is_refused_when_loading(tmp_path):
    save_image(tmp_path, "img.png", (300, 300))
    record = run(tmp_path, resolution=256).records[0]
    save_image(tmp_path, "img.png", (320, 300))
    with pytest.raises(ValueError, match="the file changed"):
        load_pixels(record, LocalStorage(str(tmp_path)))
