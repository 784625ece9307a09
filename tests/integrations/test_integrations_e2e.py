"""Real training runs on the tiny SD 1.x model with trackers, webhooks, hook scripts and the disk guard."""

from __future__ import annotations

import glob
import json
import os
import stat
import struct
import time

import pytest

from helpers.runs import base_config, train
from simpletuner.integrations.trackers import tracker_installed

WANDB_BLOCK = 32768  # the .wandb file is a LevelDB-style log of 32 KiB blocks
WANDB_FULL, WANDB_LAST = 1, 4
IMAGE_COUNT = 4  # sample images in this module's copy (the `images` fixture in tests/conftest.py)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("sd1x")


def wandb_records(path: str):
    """Protobuf records of an offline wandb run file."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    position, pending = 7, b""  # 7-byte file header
    while position + 7 <= len(data):
        room = WANDB_BLOCK - position % WANDB_BLOCK
        _, length, kind = struct.unpack("<IHB", data[position:position + 7]) if room >= 7 else (0, 0, 0)
        if room < 7 or (length == 0 and kind == 0):  # block trailer padding
            position += room
            continue
        if position + 7 + length > len(data):  # still being written
            return
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (WANDB_FULL, WANDB_LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_wandb_records(path: str, timeout_s: float = 60.0) -> list:
    """Records of the run once wandb's background writer has written its final ``exit`` record."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_report_to_all_logs_loss_to_tensorboard_and_offline_wandb(model, images, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    config = base_config("sd1x", model, tmp_path, images, report_to="all", tracker_run_name="e2e-run",
                         tracker_project_name="e2e-project", grad_clip_method="norm")
    train(config)

    events = EventAccumulator(str(tmp_path / "output" / "logs" / "e2e-project"))
    events.Reload()
    for metric in ("train_loss", "learning_rate", "step_time", "grad_norm"):
        assert [scalar.step for scalar in events.Scalars(metric)] == [1, 2, 3], metric

    (run_file,) = glob.glob(str(tmp_path / "output" / "logs" / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = finished_wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "e2e-run" and run.project == "e2e-project"
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    assert [row.step.num for row in history] == [1, 2, 3]
    losses = [{"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in row.item}["train_loss"]
              for row in history]
    assert all(isinstance(loss, float) and loss > 0 for loss in losses)


def test_webhooks_and_post_checkpoint_script_follow_the_run(model, images, tmp_path, receiver, monkeypatch):
    monkeypatch.setenv("SIMPLETUNER_JOB_ID", "job-42")
    hook = tmp_path / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$1 $2 $3" >> {tmp_path / "hook.log"}\n')
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    targets = [{"callback_url": receiver.url("/raw"), "webhook_type": "raw"},
               {"webhook_url": receiver.url("/discord"), "webhook_type": "discord", "events": ["training.checkpoint"]}]
    config = base_config("sd1x", model, tmp_path, images, checkpoint_step_interval=1,
                         webhook_config=json.dumps(targets), webhook_reporting_interval=0,
                         validation_prompt="a red circle", validation_step_interval=2, validation_resolution="64",
                         num_validation_images=1, disable_benchmark=True, validation_num_inference_steps=2,
                         post_checkpoint_script=f"{hook} {{local_checkpoint_path}} {{global_step}} {{model_family}}")
    train(config)

    output = tmp_path / "output"
    assert (tmp_path / "hook.log").read_text().splitlines() == [f"{output}/checkpoint-1 1 sd1x",
                                                                 f"{output}/checkpoint-2 2 sd1x"]
    raw = [body for path, body in receiver.requests if path == "/raw"]
    assert {body["job_id"] for body in raw} == {"job-42"}
    validations = [body for body in raw if body["type"] == "validation"]
    assert [body["global_step"] for body in validations] == [2, 3]  # the step-2 round and the final round
    assert all(os.path.exists(path) for body in validations for path in body["images"])
    raw = [body for body in raw if body["type"] != "validation"]
    assert [(body["type"], body.get("global_step")) for body in raw] == [
        ("training.status", 0), ("training.checkpoint", 1), ("training.status", 1), ("training.checkpoint", 2),
        ("training.status", 2), ("training.status", 3), ("lifecycle.stage", 3)]
    assert raw[1]["path"] == f"{output}/checkpoint-1" and raw[-1]["stage"] == "training_complete"
    discord = [body for path, body in receiver.requests if path == "/discord"]
    assert discord == [{"content": f"[job-42] Checkpoint saved to {output}/checkpoint-{step}"} for step in (1, 2)]


def test_disk_guard_stops_train_with_exit_status_2(model, images, tmp_path, monkeypatch, capsys):
    from simpletuner.cli.train import main

    monkeypatch.setenv("CONFIG_BACKEND", "cmd")
    config = base_config("sd1x", model, tmp_path, images, disk_low_threshold="1000000T")
    assert main([f"--{key}={value}" for key, value in config.items()]) == 2
    message = capsys.readouterr().err
    assert "Configuration error" in message and "below disk_low_threshold=1000000T" in message
    assert not (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.skipif(tracker_installed("comet_ml"), reason="comet_ml is installed here")
def test_missing_tracker_package_stops_train_before_loading_the_model(model, images, tmp_path, monkeypatch, capsys):
    from simpletuner.cli.train import main

    monkeypatch.setenv("CONFIG_BACKEND", "cmd")
    config = base_config("sd1x", model, tmp_path, images, report_to="comet_ml")
    assert main([f"--{key}={value}" for key, value in config.items()]) == 2
    assert "pip install comet_ml" in capsys.readouterr().err
