"""Deciding whether and how `simpletuner train` hands the run to `accelerate launch`."""

from __future__ import annotations

import pytest

from simpletuner.cli.launch import (LaunchRequest, check_request, child_environment, launch_command, launch_request,
                                    requested_sharding)
from simpletuner.config.errors import ConfigError
from simpletuner.config.loader import load_config
from simpletuner.config.settings import Settings
from simpletuner.training.distributed import adopt_local_rank
from simpletuner.training.sharding import sharding_problems

NO_CONFIG = {"HF_HOME": "/nonexistent-hf-home"}


def settings(**values) -> Settings:
    return Settings({"model_type": "lora", "mixed_precision": "no", **values})


def test_one_process_trains_in_place():
    assert launch_request(settings(), None, NO_CONFIG) is None


def test_several_processes_launch_the_same_command_through_accelerate():
    request = launch_request(settings(num_processes=2), None, NO_CONFIG)
    command = launch_command(request, settings(num_processes=2), ["--env", "mine", "--seed=3"])
    start = command.index("accelerate.commands.launch") + 1
    launch_args = command[start:command.index("-m", start)]
    assert launch_args[:4] == ["--num_processes", "2", "--num_machines", "1"]
    assert "--multi_gpu" in launch_args and launch_args[-2:] == ["--main_process_port", "0"]
    assert command[-5:] == ["simpletuner", "train", "--env", "mine", "--seed=3"]


def test_a_started_process_never_launches_again():
    for marker in ({"LOCAL_RANK": "0"}, {"WORLD_SIZE": "2"}, {"ACCELERATE_DYNAMO_BACKEND": "NO"}):
        assert launch_request(settings(num_processes=2), None, {**NO_CONFIG, **marker}) is None


def test_legacy_local_rank_argument_marks_the_process_as_launched():
    environ = dict(NO_CONFIG)
    adopt_local_rank(settings(local_rank=1), environ)
    assert environ["LOCAL_RANK"] == "1"
    assert launch_request(settings(num_processes=2), None, environ) is None


def test_training_num_processes_and_extra_args_come_from_config_env(tmp_path):
    env_file = tmp_path / "config.env"
    env_file.write_text("TRAINING_NUM_PROCESSES=2\nTRAINING_NUM_MACHINES=1\n"
                        "ACCELERATE_EXTRA_ARGS='--gpu_ids 0,1 --main_process_port 29511'\n")
    loaded = load_config([], environ={"CONFIG_BACKEND": "env", "CONFIG_PATH": str(env_file)}, cwd=str(tmp_path))
    assert loaded.settings.num_processes == 2
    request = launch_request(loaded.settings, loaded.config_path, NO_CONFIG)
    assert request.extra_args == ["--gpu_ids", "0,1", "--main_process_port", "29511"]
    command = launch_command(request, loaded.settings, [])
    assert command.count("--main_process_port") == 1  # the user's port replaces the automatic one


def test_environment_extra_args_win_over_config_env(tmp_path):
    env_file = tmp_path / "config.env"
    env_file.write_text("ACCELERATE_EXTRA_ARGS=--gpu_ids 0\n")
    request = launch_request(settings(), str(env_file), {**NO_CONFIG, "ACCELERATE_EXTRA_ARGS": "--gpu_ids 1"})
    assert request.extra_args == ["--gpu_ids", "1"]


def test_cpu_flag_with_several_processes_starts_them_all_on_the_cpu():
    request = launch_request(settings(num_processes=2), None, {**NO_CONFIG, "ACCELERATE_EXTRA_ARGS": "--cpu"})
    assert request.force_cpu and "--cpu" not in launch_command(request, settings(num_processes=2), [])
    assert child_environment(request, {})["ACCELERATE_USE_CPU"] == "true"


def test_an_accelerate_config_file_takes_priority(tmp_path):
    config_file = tmp_path / "default_config.yaml"
    config_file.write_text("distributed_type: MULTI_GPU\nnum_processes: 8\n")
    request = launch_request(settings(), None, {**NO_CONFIG, "ACCELERATE_EXTRA_ARGS": f"--config_file {config_file}"})
    command = launch_command(request, settings(num_processes=2), [])
    assert "--num_processes" not in command and command.count("--config_file") == 1


def test_several_machines_need_a_rank_and_main_address():
    request = launch_request(settings(num_processes=4, num_machines=2), None, NO_CONFIG)
    with pytest.raises(ConfigError) as caught:
        check_request(request, settings(num_processes=4, num_machines=2))
    assert "--machine_rank" in str(caught.value) and "--main_process_ip" in str(caught.value)


@pytest.mark.parametrize("extra, kind", [("--use_deepspeed --zero_stage 2", "DeepSpeed"),
                                         ("--use_fsdp --fsdp_version 2", "FSDP")])
def test_sharded_training_is_refused_with_the_reasons(extra, kind):
    request = LaunchRequest(2, 1, extra.split())
    assert requested_sharding(request) == kind
    with pytest.raises(ConfigError) as caught:
        check_request(request, settings(model_type="lora"))
    message = str(caught.value)
    assert kind in message and "model_type=lora" in message


def test_sharding_problems_name_the_missing_pieces():
    problems = sharding_problems("DeepSpeed", settings(model_type="full"), cuda=False, deepspeed_installed=False)
    assert any("deepspeed package" in p for p in problems) and any("CUDA" in p for p in problems)
    assert sharding_problems("DeepSpeed", settings(model_type="full"), cuda=True, deepspeed_installed=True) == []
    # FSDP2 runs over gloo as well, so a CPU-only machine can run it
    assert sharding_problems("FSDP", settings(model_type="full"), cuda=False, deepspeed_installed=False) == []


def test_fsdp_launches_on_a_free_port_and_fsdp_enable_counts_as_a_request():
    request = LaunchRequest(2, 1, ["--use_fsdp", "--fsdp_version", "2"])
    command = launch_command(request, settings(num_processes=2), [])
    assert "--multi_gpu" not in command and command[command.index("--main_process_port") + 1] == "0"
    assert requested_sharding(LaunchRequest(2, 1), settings(fsdp_enable=True)) == "FSDP"
    with pytest.raises(ConfigError) as caught:
        check_request(LaunchRequest(2, 1, ["--use_deepspeed"]), settings(model_type="full", fsdp_enable=True))
    assert "cannot be enabled simultaneously" in str(caught.value)


def test_an_unknown_dynamo_backend_is_refused_before_launching():
    request = LaunchRequest(2, 1)
    with pytest.raises(ConfigError) as caught:
        check_request(request, settings(dynamo_backend="turbo"))
    assert "dynamo_backend='turbo'" in str(caught.value)
