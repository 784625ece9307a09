import json

import pytest
import torch

from helpers.images import write_noise_images
from simpletuner.config.settings import Settings
from simpletuner.data.pipeline import prepare_data


class FakeFamily:
    """Loaded-encoder stand-in: 8x pooling VAE and a character-code text encoder."""

    components = object()

    def __init__(self, fingerprint="fake-model-1"):
        self._fingerprint = fingerprint
        self.images = 0
        self.prompts: list[str] = []

    def fingerprint(self):
        return self._fingerprint

    def encode_images(self, pixels):
        self.images += pixels.shape[0]
        return torch.nn.functional.avg_pool2d(pixels, 8)

    def encode_text(self, prompts):
        self.prompts.extend(prompts)
        codes = torch.tensor([[float(ord(c)) for c in (p + " " * 6)[:6]] for p in prompts])
        return {"prompt_embeds": codes[:, :, None].repeat(1, 1, 4), "pooled_prompt_embeds": codes}


@pytest.fixture
def workspace(tmp_path):
    images = tmp_path / "images"
    write_noise_images(images, [(96, 64) if number % 2 else (64, 96) for number in range(6)], seed=1, stem="p")
    for number in range(6):
        (images / f"p{number}.txt").write_text(f"photo number {number}\nanother caption {number}")
    config = tmp_path / "multidatabackend.json"

    def write(resolution=64):
        config.write_text(json.dumps([
            {"id": "subject", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile",
             "resolution": resolution, "resolution_type": "pixel", "crop": True, "crop_style": "center",
             "crop_aspect": "square", "minimum_image_size": 0, "cache_dir_vae": str(tmp_path / "vae")},
            {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True,
             "cache_dir": str(tmp_path / "text")},
        ]))
        return Settings({"data_backend_config": str(config), "train_batch_size": 2, "seed": 5,
                         "validation_prompt": "a validation prompt", "override_dataset_config": True})

    return write


def test_check_then_build_then_train_batches(workspace):
    settings = workspace()
    checked = prepare_data(settings, family_fingerprint="fake-model-1", progress=False)
    report = checked.report()
    assert "6 to encode (new file: 6)" in report
    assert "Text embeds 'text'" in report and "new caption" in report
    assert "steps per epoch" in report

    family = FakeFamily()
    built = prepare_data(settings, family=family, progress=False)
    assert family.images == 6
    assert {"", "a validation prompt", "photo number 3"} <= set(family.prompts)
    assert "6 cached, 0 to encode" in built.report()
    prepared = built.next_batch()
    assert prepared.batch.latents.shape == (2, 3, 8, 8)
    assert set(prepared.batch.text) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert prepared.epoch == 1 and built.steps_per_epoch == 3
    built.close()

    again = FakeFamily()
    prepare_data(settings, family=again, progress=False)
    assert again.images == 0 and again.prompts == []


def test_report_explains_model_and_resolution_changes(workspace):
    prepare_data(workspace(), family=FakeFamily(), progress=False)
    assert "model changed: 6" in prepare_data(workspace(), family_fingerprint="fake-model-2",
                                              progress=False).report()
    assert "resolution or crop changed: 6" in prepare_data(workspace(resolution=128),
                                                           family_fingerprint="fake-model-1",
                                                           progress=False).report()


def test_clear_each_epoch_recrops_and_encodes_at_batch_time(tmp_path):
    images = tmp_path / "images"
    write_noise_images(images, [(128, 96)] * 4, seed=2, stem="w")
    config = tmp_path / "multidatabackend.json"
    config.write_text(json.dumps([
        {"id": "wide", "instance_data_dir": str(images), "resolution": 64, "resolution_type": "pixel", "crop": True,
         "crop_style": "random", "crop_aspect": "square", "minimum_image_size": 0,
         "cache_dir_vae": str(tmp_path / "vae")}]))
    settings = Settings({"data_backend_config": str(config), "train_batch_size": 2, "seed": 3,
                         "cache_dir": str(tmp_path / "cache")})
    family = FakeFamily()
    pipeline = prepare_data(settings, family=family, progress=False)
    assert pipeline.needs_vae_for_batches
    first_crops = {r.path: r.crop_offset for r in pipeline.datasets["wide"].index.records}
    for _ in range(pipeline.steps_per_epoch):
        pipeline.next_batch()
    assert family.images == 4  # built ahead of epoch 1
    prepared = pipeline.next_batch()
    assert prepared.epoch == 2 and family.images == 6  # cache cleared: encoded at batch time
    second_crops = {r.path: r.crop_offset for r in pipeline.datasets["wide"].index.records}
    assert second_crops != first_crops
    assert [r.crop_offset for r in prepared.records] == [second_crops[r.path] for r in prepared.records]
    pipeline.close()
