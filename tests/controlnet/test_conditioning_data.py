"""Conditioning datasets in the data pipeline: pairing, identical crops, latents, masks and the errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from helpers.conditioning_data import image_files, make_half_masks, write_conditioning_dataset
from simpletuner.config.settings import Settings
from simpletuner.data.dataset_config import DatasetConfigError
from simpletuner.data.pipeline import prepare_data


class PoolingFamily:
    """Loaded-encoder stand-in: the 'VAE' averages 8x8 pixel cells, so latents show exactly which pixels went in."""

    components = object()

    def fingerprint(self):
        return "pooling-family"

    def encode_images(self, pixels):
        return torch.nn.functional.avg_pool2d(pixels.float(), 8)

    def encode_text(self, prompts):
        return {"prompt_embeds": torch.zeros(len(prompts), 3, 4)}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from simpletuner.demo.sample_data import make_sample_images

    folder = tmp_path_factory.mktemp("images")
    make_sample_images(str(folder), count=6)
    return folder


def copy_as_png(images, out):
    """The training images themselves as conditioning images (decoded pixels, saved losslessly as .png)."""
    out.mkdir(parents=True, exist_ok=True)
    for path in image_files(images):
        with Image.open(path) as image:
            image.convert("RGB").save(out / f"{path.stem}.png")
    return out


def settings_for(config, **values):
    return Settings({"data_backend_config": str(config), "train_batch_size": 2, "seed": 3, "resolution": 64,
                     "resolution_type": "pixel", "override_dataset_config": True, **values})


def batches(data, count=3):
    return [data.next_batch().batch for _ in range(count)]


def test_control_image_gets_exactly_its_training_image_crop(images, tmp_path):
    control = copy_as_png(images, tmp_path / "control")
    config = write_conditioning_dataset(tmp_path, images, {"edges": (control, "controlnet")}, crop_style="random",
                                        crop_aspect="preserve")
    data = prepare_data(settings_for(config, controlnet=True, model_family="sdxl"), family=PoolingFamily(),
                        progress=False)
    for batch in batches(data, 4):
        assert batch.conditioning_pixels is not None and batch.conditioning_latents is None
        assert batch.conditioning_pixels.shape[-2:] == tuple(batch.target_sizes[0])
        # Same pixels, same plan: pooling the control image gives the training image's latents.
        assert torch.allclose(torch.nn.functional.avg_pool2d(batch.conditioning_pixels, 8), batch.latents, atol=1e-5)


def test_latent_families_get_cached_control_latents(images, tmp_path):
    control = copy_as_png(images, (tmp_path / "control"))
    config = write_conditioning_dataset(tmp_path, images, {"edges": (control, "controlnet")})
    data = prepare_data(settings_for(config, controlnet=True, model_family="flux"), family=PoolingFamily(),
                        progress=False)
    assert [path for path in (tmp_path / "cache" / "vae-edges").rglob("*") if path.is_file()]
    for batch in batches(data, 2):
        assert batch.conditioning_pixels is None
        assert torch.allclose(batch.conditioning_latents, batch.latents, atol=1e-5)
    assert "control latents" in data.report()


def test_control_image_at_another_size_is_scaled_first(images, tmp_path):
    from helpers.conditioning_data import make_edge_maps

    half = make_edge_maps(images, tmp_path / "half", scale=0.5)
    full = make_edge_maps(images, tmp_path / "full")
    pixels = []
    for folder in (half, full):
        config = write_conditioning_dataset(tmp_path, images, {"edges": (folder, "controlnet")})
        data = prepare_data(settings_for(config, controlnet=True, model_family="sd1x"), family=PoolingFamily(),
                            progress=False)
        pixels.append(data.next_batch().batch.conditioning_pixels)
    assert pixels[0].shape == pixels[1].shape
    assert (pixels[0] - pixels[1]).abs().mean() < 0.15  # same edges, only resampled differently


def test_missing_conditioning_file_is_named(images, tmp_path):
    control = copy_as_png(images, (tmp_path / "control"))
    victim = sorted(control.iterdir())[2]
    victim.unlink()
    config = write_conditioning_dataset(tmp_path, images, {"edges": (control, "controlnet")})
    with pytest.raises(DatasetConfigError) as caught:
        prepare_data(settings_for(config, controlnet=True, model_family="sdxl"), family=PoolingFamily(),
                     progress=False)
    message = str(caught.value)
    assert victim.stem in message and "'edges'" in message and str(control) in message


def test_conditioning_image_with_another_aspect_ratio_is_refused(images, tmp_path):
    control = copy_as_png(images, (tmp_path / "control"))
    for path in control.iterdir():
        Image.new("RGB", (40, 90)).save(path)
    config = write_conditioning_dataset(tmp_path, images, {"edges": (control, "controlnet")})
    data = prepare_data(settings_for(config, controlnet=True, model_family="sdxl"), family=PoolingFamily(),
                        progress=False)
    with pytest.raises(DatasetConfigError, match="aspect ratio"):
        data.next_batch()


def test_mask_dataset_gives_loss_masks(images, tmp_path):
    masks = make_half_masks(images, tmp_path / "masks")
    config = write_conditioning_dataset(tmp_path, images, {"masks": (masks, "mask")}, crop_style="center")
    data = prepare_data(settings_for(config), family=PoolingFamily(), progress=False)
    batch = data.next_batch().batch
    assert batch.conditioning_pixels is None
    mask = batch.loss_mask
    assert mask.shape == (2, 1, *batch.target_sizes[0])
    assert set(torch.unique(mask.round()).tolist()) <= {0.0, 1.0}
    assert mask.mean() > 0.2 and mask.mean() < 0.8  # part of each image is masked out


def test_masked_loss_probability_decides_per_batch(images, tmp_path):
    masks = make_half_masks(images, tmp_path / "masks")
    config = write_conditioning_dataset(tmp_path, images, {"masks": (masks, "mask")})
    never = prepare_data(settings_for(config, masked_loss_probability=0.0), family=PoolingFamily(), progress=False)
    assert all(batch.loss_mask is None for batch in batches(never, 3))
    half = prepare_data(settings_for(config, masked_loss_probability=0.5), family=PoolingFamily(), progress=False)
    used = [batch.loss_mask is not None for batch in batches(half, 12)]
    assert any(used) and not all(used)


def test_random_sampling_between_two_control_datasets(images, tmp_path):
    first = copy_as_png(images, (tmp_path / "first"))
    second = tmp_path / "second"
    second.mkdir()
    for path in first.iterdir():
        Image.new("RGB", Image.open(path).size, (255, 255, 255)).save(second / path.name)
    config = write_conditioning_dataset(tmp_path, images, {"first": (first, "controlnet"),
                                                           "second": (second, "controlnet")})
    data = prepare_data(settings_for(config, controlnet=True, model_family="sdxl"), family=PoolingFamily(),
                        progress=False)
    white = [bool((pixels == 1).all()) for batch in batches(data, 6) for pixels in batch.conditioning_pixels]
    assert any(white) and not all(white)


@pytest.mark.parametrize("change, message", [
    ({"controlnet": False}, "controlnet is off"),
    ({"unlink": True}, "needs a control image"),
    ({"target": "text"}, "dataset_type 'text_embeds'"),
    ({"target": "nowhere"}, "no dataset has the id 'nowhere'"),
])
def test_link_problems_are_reported(images, tmp_path, change, message):
    control = copy_as_png(images, (tmp_path / "control"))
    config = write_conditioning_dataset(tmp_path, images, {"edges": (control, "controlnet")})
    backends = json.loads(config.read_text())
    if change.get("unlink"):
        del backends[0]["conditioning_data"]
    if "target" in change:
        backends[0]["conditioning_data"] = change["target"]
    config.write_text(json.dumps(backends))
    settings = settings_for(config, controlnet=change.get("controlnet", True), model_family="sdxl")
    with pytest.raises(DatasetConfigError, match=message):
        prepare_data(settings, family=PoolingFamily(), progress=False)


def test_source_dataset_id_links_like_conditioning_data(images, tmp_path):
    control = copy_as_png(images, (tmp_path / "control"))
    config = write_conditioning_dataset(tmp_path, images, {"edges": (control, "controlnet")})
    backends = json.loads(config.read_text())
    del backends[0]["conditioning_data"]
    backends[1]["source_dataset_id"] = "shapes"
    config.write_text(json.dumps(backends))
    data = prepare_data(settings_for(config, controlnet=True, model_family="sdxl"), family=PoolingFamily(),
                        progress=False)
    assert data.next_batch().batch.conditioning_pixels is not None
