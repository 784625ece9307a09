"""`simpletuner train` with two CPU processes (gloo): shared caches, disjoint samples, data-parallel
equivalence with one process, and a lost rank stopping the other one."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import base_config, train
from helpers.train_process import Run, sample_lines
from helpers.train_process import write_config as write_run_config

IMAGES = 8


@pytest.fixture(scope="module")
def assets(tiny_model, tmp_path_factory):
    from simpletuner.demo.sample_data import make_sample_images

    root = tmp_path_factory.mktemp("distributed")
    make_sample_images(str(root / "images"), count=IMAGES)  # more than the six shared sample images
    return Path(tiny_model("sd1x")), root / "images"


def write_config(folder: Path, assets, **overrides) -> dict:
    model, images = assets
    # lora_dropout draws masks from each process's own RNG; without it a step is deterministic.
    settings = {"optimizer": "optimi-adamw", "train_batch_size": 1, "lora_dropout": 0, **overrides}
    return write_run_config(folder, base_config("sd1x", model, folder, images, **settings))


@pytest.fixture(scope="module")
def two_process_run(assets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    config = write_config(folder, assets, num_processes=2, max_train_steps=3)
    output = Run(folder).succeed()
    return folder, config, output


def test_two_processes_build_caches_once_and_never_share_a_sample(two_process_run, assets):
    from diffusers import StableDiffusionPipeline

    folder, config, output = two_process_run
    assert "rank 0: encoded 8 latents" in output and "rank 1: encoded 0 latents" in output
    assert len(glob.glob(str(folder / "cache" / "vae" / "*" / "*.safetensors"))) == IMAGES
    assert not (Path(config["output_dir"]) / ".watchdog").exists(), "a clean run leaves no heartbeats behind"
    lines = sample_lines(Path(config["output_dir"]))
    assert [line["step"] for line in lines[0]] == [1, 2, 3] == [line["step"] for line in lines[1]]
    for first, second in zip(lines[0], lines[1]):
        assert first["rank"] == 0 and second["rank"] == 1
        assert not set(first["samples"]) & set(second["samples"]), f"step {first['step']} shared a sample"
    pipeline = StableDiffusionPipeline.from_pretrained(str(assets[0]))
    pipeline.load_lora_weights(config["output_dir"])
    image = pipeline("a red circle", num_inference_steps=1, height=64, width=64, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
    assert image.shape[-1] == 64


def test_two_processes_match_one_process_with_the_global_batch(two_process_run, tmp_path):
    folder, config, _ = two_process_run
    single = {**config, "num_processes": 1, "train_batch_size": 2, "output_dir": str(tmp_path / "single")}
    train(single)
    together = load_file(str(Path(config["output_dir"]) / "pytorch_lora_weights.safetensors"))
    alone = load_file(str(tmp_path / "single" / "pytorch_lora_weights.safetensors"))
    assert together.keys() == alone.keys()
    for key in together:
        assert torch.allclose(together[key], alone[key], atol=1e-4), key


def rank_pid(output_dir: Path, rank: int) -> int:
    beats = glob.glob(str(output_dir / ".watchdog" / "*" / f"rank-{rank}.json"))
    return json.loads(Path(beats[0]).read_text())["pid"]


def test_a_lost_rank_stops_the_other_and_the_run_resumes(assets, tmp_path):
    config = write_config(tmp_path, assets, max_train_steps=40, checkpoint_step_interval=2)
    output_dir = Path(config["output_dir"])
    env = {"TRAINING_NUM_PROCESSES": "2", "SIMPLETUNER_WATCHDOG_TIMEOUT": "20"}
    run = Run(tmp_path, **env)
    deadline = time.monotonic() + 150
    while not (output_dir / "checkpoint-2" / "manifest.json").exists():
        assert run.process.poll() is None, run.output()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint-2 in time"
        time.sleep(0.05)
    os.kill(rank_pid(output_dir, 1), signal.SIGKILL)
    killed_at = time.monotonic()
    assert run.wait(timeout=60) != 0
    assert time.monotonic() - killed_at < 20, "the surviving rank outlived the watchdog timeout"
    assert "[rank 0] watchdog: lost rank 1" in run.output(), run.output()[-4000:]
    assert not (output_dir / "pytorch_lora_weights.safetensors").exists()

    resumed = Run(tmp_path, "--resume_from_checkpoint=latest", "--max_train_steps=4", **env).succeed()
    assert "Resumed from" in resumed and "checkpoint-2 at step 2" in resumed
    assert (output_dir / "pytorch_lora_weights.safetensors").exists()
    lines = sample_lines(output_dir)
    assert [line["step"] for line in lines[1]][-2:] == [3, 4]


def test_a_frozen_rank_is_named_by_the_watchdog_instead_of_hanging(assets, tmp_path):
    config = write_config(tmp_path, assets, max_train_steps=40, num_processes=2)
    output_dir = Path(config["output_dir"])
    run = Run(tmp_path, SIMPLETUNER_WATCHDOG_TIMEOUT="8")
    deadline = time.monotonic() + 150
    while not (output_dir / "debug" / "sample_ids-rank1.jsonl").exists():
        assert run.process.poll() is None and time.monotonic() < deadline, run.output()[-4000:]
        time.sleep(0.05)
    frozen = rank_pid(output_dir, 1)
    os.kill(frozen, signal.SIGSTOP)  # alive but silent: the launcher cannot tell, the collectives would wait
    stopped_at = time.monotonic()
    try:
        while "[rank 0] watchdog: lost rank 1" not in run.output():
            assert time.monotonic() - stopped_at < 30, "rank 0 kept waiting on the frozen rank"
            time.sleep(0.1)
    finally:
        os.kill(frozen, signal.SIGKILL)
    assert run.wait(timeout=60) != 0
    assert "has sent no heartbeat" in run.output()


def test_resume_gives_every_rank_back_its_own_random_state(assets, tmp_path):
    """lora_dropout draws its masks from each process's own generator, so a resumed run equals an uninterrupted
    one only when every rank gets its own random state back (rank 1 restoring rank 0's would differ)."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    whole.mkdir(), resumed.mkdir()
    first = write_config(whole, assets, lora_dropout=0.5, num_processes=2, max_train_steps=4,
                         checkpoint_step_interval=2)
    Run(whole).succeed()
    checkpoint = Path(first["output_dir"]) / "checkpoint-2"
    assert (checkpoint / "rng-rank0.pt").exists() and (checkpoint / "rng-rank1.pt").exists()
    second = write_config(resumed, assets, lora_dropout=0.5, num_processes=2, max_train_steps=4,
                          data_backend_config=first["data_backend_config"])
    shutil.copytree(checkpoint, Path(second["output_dir"]) / "checkpoint-2")
    assert "checkpoint-2 at step 2" in Run(resumed).succeed()
    uninterrupted = load_file(str(Path(first["output_dir"]) / "pytorch_lora_weights.safetensors"))
    continued = load_file(str(Path(second["output_dir"]) / "pytorch_lora_weights.safetensors"))
    for key in uninterrupted:
        assert torch.allclose(continued[key], uninterrupted[key], atol=1e-6), key
