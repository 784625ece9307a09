import json
import os
import random

import numpy as np
import pytest
import torch

from simpletuner.config.errors import ConfigError
from simpletuner.training import checkpoints
from simpletuner.training.checkpoints import (
    MANIFEST_NAME,
    capture_rng_state,
    config_differences,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume_path,
    restore_rng_state,
    rotate_checkpoints,
    save_checkpoint,
)

SUMMARY = {"model_family": "sdxl", "lora_rank": 16, "lora_alpha": None, "target_modules": ["to_q", "to_k"]}


def _state(step: int = 1) -> dict:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return {
        "adapter": {"layer.lora_A.weight": torch.full((2, 3), float(step)), "layer.lora_B.weight": torch.zeros(3, 2)},
        "optimizer": optimizer.state_dict(),
        "rng": capture_rng_state(),
        "training_state": {"global_step": step, "epoch": 1},
    }


def test_round_trip(tmp_path):
    state = _state(7)
    path = save_checkpoint(str(tmp_path), 7, 2, state, SUMMARY)
    assert path == str(tmp_path / "checkpoint-7")
    assert sorted(os.listdir(path)) == sorted(["adapter.safetensors", "optimizer.pt", "rng.pt", "training_state.pt",
                                               MANIFEST_NAME])
    loaded, manifest = load_checkpoint(path)
    assert manifest["step"] == 7 and manifest["epoch"] == 2 and manifest["config"]["lora_rank"] == 16
    assert set(manifest["files"]) == set(state)
    torch.testing.assert_close(loaded["adapter"]["layer.lora_A.weight"], state["adapter"]["layer.lora_A.weight"])
    assert loaded["training_state"] == {"global_step": 7, "epoch": 1}
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    torch.testing.assert_close(fresh.state_dict()["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])


def test_manifest_is_written_last(tmp_path, monkeypatch):
    written = []
    real_write = checkpoints._write_state_files

    def record(folder, state):
        files = real_write(folder, state)
        written.append(sorted(os.listdir(folder)))
        return files

    monkeypatch.setattr(checkpoints, "_write_state_files", record)
    save_checkpoint(str(tmp_path), 1, 1, _state(), SUMMARY)
    assert written and MANIFEST_NAME not in written[0]


def test_interrupted_write_leaves_no_checkpoint(tmp_path, monkeypatch):
    def fail_midway(value, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.torch, "save", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(str(tmp_path), 5, 1, _state(), SUMMARY)
    assert os.listdir(tmp_path) == []
    assert find_latest_checkpoint(str(tmp_path)) is None


def test_resaving_a_step_replaces_it(tmp_path):
    save_checkpoint(str(tmp_path), 3, 1, _state(1), SUMMARY)
    path = save_checkpoint(str(tmp_path), 3, 1, _state(2), SUMMARY)
    loaded, _ = load_checkpoint(path)
    assert loaded["adapter"]["layer.lora_A.weight"][0, 0].item() == 2.0
    assert os.listdir(tmp_path) == ["checkpoint-3"]


def test_without_tempdir_the_manifest_still_marks_completion(tmp_path):
    path = save_checkpoint(str(tmp_path), 4, 1, _state(), SUMMARY, use_tempdir=False)
    assert load_checkpoint(path)[1]["step"] == 4


def test_latest_skips_folders_without_manifest_and_temp_folders(tmp_path):
    save_checkpoint(str(tmp_path), 10, 1, _state(), SUMMARY)
    save_checkpoint(str(tmp_path), 20, 1, _state(), SUMMARY)
    (tmp_path / "checkpoint-30").mkdir()  # unfinished: no manifest
    (tmp_path / ".checkpoint-40.tmp-abc").mkdir()
    (tmp_path / "checkpoint-40-notes").mkdir()
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-20")
    assert resolve_resume_path(str(tmp_path), "latest") == str(tmp_path / "checkpoint-20")


def test_resolve_resume_path(tmp_path):
    assert resolve_resume_path(str(tmp_path), None) is None
    assert resolve_resume_path(str(tmp_path), "none") is None
    assert resolve_resume_path(str(tmp_path), "latest") is None  # nothing saved yet: start fresh
    saved = save_checkpoint(str(tmp_path), 10, 1, _state(), SUMMARY)
    assert resolve_resume_path(str(tmp_path), "checkpoint-10") == saved
    assert resolve_resume_path(str(tmp_path), saved) == saved
    (tmp_path / "checkpoint-30").mkdir()
    with pytest.raises(ConfigError, match=f"no {MANIFEST_NAME}"):
        resolve_resume_path(str(tmp_path), "checkpoint-30")
    with pytest.raises(ConfigError, match="no such folder"):
        resolve_resume_path(str(tmp_path), "checkpoint-99")
    with pytest.raises(ConfigError, match="remote"):
        resolve_resume_path(str(tmp_path), "s3://bucket/run/checkpoint-10")


def test_damaged_file_is_reported(tmp_path):
    path = save_checkpoint(str(tmp_path), 1, 1, _state(), SUMMARY)
    with open(os.path.join(path, "optimizer.pt"), "ab") as handle:
        handle.write(b"junk")
    with pytest.raises(ValueError, match="damaged: optimizer.pt"):
        load_checkpoint(path)


def test_rotation_keeps_the_newest(tmp_path):
    for step in (5, 10, 15, 20):
        save_checkpoint(str(tmp_path), step, 1, _state(), SUMMARY)
    for step in (21, 22, 23):
        save_checkpoint(str(tmp_path), step, 1, _state(), SUMMARY, rolling=True)
    (tmp_path / ".checkpoint-25.tmp-left-over").mkdir()
    removed = rotate_checkpoints(str(tmp_path), total_limit=2, rolling_limit=1)
    assert sorted(os.path.basename(p) for p in removed) == [
        "checkpoint-10", "checkpoint-5", "rolling-checkpoint-21", "rolling-checkpoint-22"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-15", "checkpoint-20", "rolling-checkpoint-23"]
    assert [step for step, _ in list_checkpoints(str(tmp_path), rolling=False)] == [15, 20]
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path / "rolling-checkpoint-23")
    assert rotate_checkpoints(str(tmp_path), total_limit=None, rolling_limit=None) == []


def test_config_differences_name_each_changed_key():
    current = {**SUMMARY, "lora_rank": 32, "model_family": "flux"}
    assert config_differences(SUMMARY, SUMMARY) == []
    assert config_differences(json.loads(json.dumps(SUMMARY)), dict(SUMMARY, target_modules=("to_q", "to_k"))) == []
    assert config_differences(SUMMARY, current) == ["model_family: saved 'sdxl', now 'flux'",
                                                    "lora_rank: saved 16, now 32"]
    assert config_differences(SUMMARY, dict(SUMMARY, lora_alpha=8)) == ["lora_alpha: saved unset, now 8"]


def test_rng_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    path = save_checkpoint(str(tmp_path), 1, 1, {"rng": capture_rng_state()}, SUMMARY)
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(path)[0]["rng"])
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected
