"""delete_model_after_load: a hub model's cached files go once loaded; local folders and shared blobs stay.

The tests build a Hugging Face cache (blobs, snapshot links, refs) holding the tiny SDXL model and point
huggingface_hub at it offline, so the trainer loads "tiny/sdxl" through the same from_pretrained path as a
downloaded model.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from helpers.runs import base_config, run_trainer
from simpletuner.training import model_file_cleanup
from simpletuner.training.model_file_cleanup import ComponentFiles, delete_component_files, snapshot_folder

IMAGE_COUNT = 4  # sample images in this module's copy (the `images` fixture in tests/conftest.py)
REPO_ID = "tiny/sdxl"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
WEIGHT_FOLDERS = {"unet", "vae", "text_encoder", "text_encoder_2"}


def cache_model(model_dir: str, cache: Path, repo_id: str = REPO_ID, commit: str = COMMIT,
                branch: str = "main") -> Path:
    """Lay ``model_dir`` out as the hub cache does; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    snapshot = repo / "snapshots" / commit
    for source in Path(model_dir).rglob("*"):
        if source.is_dir():
            continue
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / source.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def top_level(snapshot: Path) -> set[str]:
    return {path.name for path in snapshot.iterdir()}


def test_a_hub_model_leaves_the_cache_once_loaded_and_cached(tiny_model, images, tmp_path, hub_cache, monkeypatch):
    snapshot = cache_model(tiny_model("sdxl"), hub_cache)
    blobs = snapshot.parent.parent / "blobs"
    blob_count = len(list(blobs.iterdir()))
    seen_before_caching = {}
    original = model_file_cleanup.delete_encoder_files

    def delete_encoder_files(trainer):
        seen_before_caching["folders"] = top_level(snapshot)
        original(trainer)

    monkeypatch.setattr(model_file_cleanup, "delete_encoder_files", delete_encoder_files)
    trainer = run_trainer(base_config("sdxl", REPO_ID, tmp_path, images, delete_model_after_load=True,
                                      validation_disable=True))
    # The UNet's files went right after loading; the encoders' waited for the caches.
    assert "unet" not in seen_before_caching["folders"] and {"vae", "text_encoder"} <= seen_before_caching["folders"]
    assert top_level(snapshot) == {"model_index.json", "scheduler", "tokenizer", "tokenizer_2"}
    remaining = {path.resolve() for path in snapshot.rglob("*") if path.is_symlink()}
    assert set(blobs.iterdir()) == remaining and len(remaining) < blob_count  # the weights' blobs are gone too
    assert trainer.state.global_step == 3
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").is_file()


def test_validation_keeps_the_vae_and_the_encoders_it_loads_again(tiny_model, images, tmp_path, hub_cache):
    snapshot = cache_model(tiny_model("sdxl"), hub_cache)
    run_trainer(base_config("sdxl", REPO_ID, tmp_path, images, max_train_steps=1, delete_model_after_load=True,
                            fully_unload_text_encoder=True,
                            validation_prompt="a red circle", validation_resolution="64", num_validation_images=1,
                            validation_num_inference_steps=1, validation_disable_unconditional=True))
    assert WEIGHT_FOLDERS & top_level(snapshot) == {"vae", "text_encoder", "text_encoder_2"}
    assert list((tmp_path / "output" / "validation_images").glob("step000001_*.png"))  # rendered after reloading


def test_a_blob_another_snapshot_links_is_kept(tiny_model, hub_cache):
    old = cache_model(tiny_model("sdxl"), hub_cache, commit="a" * 40, branch="v1")
    new = cache_model(tiny_model("sdxl"), hub_cache)  # same files: the same blobs
    freed = delete_component_files(ComponentFiles("VAE", REPO_ID, "vae", "v1"))
    assert freed == 0 and not (old / "vae").exists()  # the revision named through refs/v1
    assert all(path.resolve().is_file() for path in (new / "vae").rglob("*") if path.is_symlink())
    freed = delete_component_files(ComponentFiles("VAE", REPO_ID, "vae"))
    assert freed > 0 and not (new / "vae").exists()


def test_local_folders_and_unknown_repositories_are_not_touched(tiny_model, hub_cache):
    model = tiny_model("sdxl")  # the session's read-only copy: the conftest guard reports any change
    assert delete_component_files(ComponentFiles("denoiser", model, "unet")) is None
    assert delete_component_files(ComponentFiles("denoiser", "someone/else", "unet")) is None
    assert snapshot_folder("someone/else") is None
