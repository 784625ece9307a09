"""Running ``simpletuner train`` as several processes through ``accelerate launch``.

When num_processes (TRAINING_NUM_PROCESSES) or num_machines
(TRAINING_NUM_MACHINES) is above 1, ACCELERATE_EXTRA_ARGS is set, or an
accelerate config file exists, ``simpletuner train`` starts
``python -m accelerate.commands.launch ... -m simpletuner train <same argv>``
and waits for it. Each started process loads the same configuration and, seeing
the launcher's environment (LOCAL_RANK, WORLD_SIZE, ...), trains in-process.

An accelerate config file (``--config_file`` in ACCELERATE_EXTRA_ARGS, or
accelerate's default_config.yaml) takes priority: its process count, machines,
precision and distributed type are used instead of ours. ACCELERATE_EXTRA_ARGS
(environment, or config.env) is appended last, so its flags win.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Mapping

from simpletuner.config import sources
from simpletuner.config.errors import ConfigError
from simpletuner.training import distributed, sharding
from simpletuner.training.compilation import dynamo_backend_name

logger = logging.getLogger("simpletuner.launch")

EXTRA_ARGS_VARIABLE = "ACCELERATE_EXTRA_ARGS"
# accelerate launch accepts only one of these; when the user names one, we add none.
MODE_FLAGS = ("--multi_gpu", "--cpu", "--tpu", "--use_deepspeed", "--use_fsdp", "--use_megatron_lm")
DEEPSPEED_FLAGS = ("--use_deepspeed", "--deepspeed_config_file", "--zero_stage")
FSDP_FLAGS = ("--use_fsdp", "--fsdp_version")


@dataclass
class LaunchRequest:
    num_processes: int
    num_machines: int
    extra_args: list[str] = field(default_factory=list)
    config_file: str | None = None  # an accelerate config file that takes priority over our settings
    force_cpu: bool = False  # --cpu in ACCELERATE_EXTRA_ARGS: every process on the CPU


def _has_flag(args: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in args)


def _flag_value(args: list[str], flag: str) -> str | None:
    for index, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
    return None


def accelerate_config_file(extra_args: list[str], environ: Mapping[str, str]) -> str | None:
    """The accelerate config file in force: --config_file, else accelerate's default one if it exists."""
    named = _flag_value(extra_args, "--config_file")
    if named:
        return named
    hf_home = environ.get("HF_HOME") or os.path.join(environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    default = os.path.join(os.path.expanduser(hf_home), "accelerate", "default_config.yaml")
    return default if os.path.isfile(default) else None


def launch_request(settings, config_path: str | None, environ: Mapping[str, str]) -> LaunchRequest | None:
    """What to launch, or None to train in this process (one process, or already started by a launcher)."""
    if distributed.launched_by_launcher(environ):
        return None
    try:
        extra = shlex.split(sources.launcher_variable(EXTRA_ARGS_VARIABLE, config_path, environ))
    except ValueError as error:
        raise ConfigError(EXTRA_ARGS_VARIABLE, f"{EXTRA_ARGS_VARIABLE} cannot be split into arguments: {error}. "
                                               "Check its quotes.") from None
    processes, machines = int(settings.num_processes or 1), int(settings.num_machines or 1)
    if processes < 1 or machines < 1:
        raise ConfigError("num_processes", f"num_processes={processes} and num_machines={machines} must both be at "
                                           "least 1 (TRAINING_NUM_PROCESSES / TRAINING_NUM_MACHINES).")
    config_file = accelerate_config_file(extra, environ)
    if processes == 1 and machines == 1 and not extra and config_file is None:
        return None
    force_cpu = _has_flag(extra, "--cpu")
    if force_cpu and processes > 1:
        extra = [arg for arg in extra if arg != "--cpu"]  # accelerate's --cpu would start a single process
    return LaunchRequest(processes, machines, extra, config_file, force_cpu)


def requested_sharding(request: LaunchRequest, settings=None) -> str | None:
    """"FSDP" / "DeepSpeed" when the launch asks for it: flags, the accelerate config file, or fsdp_enable."""
    deepspeed = any(_has_flag(request.extra_args, flag) for flag in DEEPSPEED_FLAGS)
    fsdp = any(_has_flag(request.extra_args, flag) for flag in FSDP_FLAGS) or bool(settings and settings.fsdp_enable)
    if request.config_file and os.path.isfile(request.config_file):
        import yaml

        with open(request.config_file, encoding="utf-8") as handle:
            content = yaml.safe_load(handle) or {}
        kind = sharding.DISTRIBUTED_TYPES.get(str(content.get("distributed_type", "")).upper())
        deepspeed, fsdp = deepspeed or kind == sharding.DEEPSPEED, fsdp or kind == sharding.FSDP
    if deepspeed and fsdp:
        raise ConfigError("fsdp_enable", sharding.BOTH_REQUESTED)
    return sharding.DEEPSPEED if deepspeed else sharding.FSDP if fsdp else None


def check_request(request: LaunchRequest, settings) -> None:
    """Refuse, before starting any process, what cannot run."""
    kind = requested_sharding(request, settings)
    problems = sharding.sharding_problems(kind, settings) if kind else []
    if problems:
        raise ConfigError("fsdp_enable" if settings.fsdp_enable else EXTRA_ARGS_VARIABLE, " ".join(problems))
    dynamo_backend_name(settings)
    if request.config_file is None and request.num_machines > 1:
        missing = [flag for flag in ("--machine_rank", "--main_process_ip")
                   if not _has_flag(request.extra_args, flag)]
        if missing:
            raise ConfigError("num_machines", f"num_machines={request.num_machines} needs {' and '.join(missing)} "
                                              f"in {EXTRA_ARGS_VARIABLE} (plus --main_process_port), e.g. "
                                              f"{EXTRA_ARGS_VARIABLE}='--machine_rank 0 --main_process_ip 10.0.0.1 "
                                              "--main_process_port 29500' on the first machine, or an accelerate "
                                              "config file on each machine.")
    if request.num_processes % request.num_machines:
        raise ConfigError("num_processes", f"num_processes={request.num_processes} counts the processes of all "
                                           f"machines and must divide evenly by num_machines={request.num_machines}.")


def launch_arguments(request: LaunchRequest, settings) -> list[str]:
    """The options given to ``accelerate launch`` before the training module."""
    if request.config_file is not None:
        given = _has_flag(request.extra_args, "--config_file")
        return ([] if given else ["--config_file", request.config_file]) + request.extra_args
    args = ["--num_processes", str(request.num_processes), "--num_machines", str(request.num_machines),
            "--mixed_precision", settings.mixed_precision or "no",
            "--dynamo_backend", "no"]  # compile settings reach the processes through the config itself
    several = request.num_processes > 1 or request.num_machines > 1
    if several and not any(_has_flag(request.extra_args, flag) for flag in MODE_FLAGS):
        args.append("--multi_gpu")  # torchrun-style start; without GPUs the processes use gloo on the CPU
    if several and request.num_machines == 1 and not _has_flag(request.extra_args, "--main_process_port"):
        args += ["--main_process_port", "0"]  # a free port, so two runs on one machine do not collide
    return args + request.extra_args


def launch_command(request: LaunchRequest, settings, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *launch_arguments(request, settings),
            "-m", "simpletuner", "train", *argv]


def child_environment(request: LaunchRequest, environ: Mapping[str, str]) -> dict[str, str]:
    import torch

    env = dict(environ)
    if request.force_cpu or not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def run_launch(request: LaunchRequest, settings, argv: list[str], environ: Mapping[str, str]) -> int:
    """Start the processes and wait; returns their launcher's exit status."""
    check_request(request, settings)
    command = launch_command(request, settings, argv)
    if request.config_file is not None:
        logger.info("Using the accelerate config %s: its process count, machines, precision and distributed type "
                    "take priority over num_processes / num_machines / mixed_precision.", request.config_file)
    logger.info("Launching: %s", shlex.join(command))
    completed = subprocess.run(command, env=child_environment(request, environ), check=False)
    if completed.returncode != 0:
        logger.error("The training processes stopped with exit status %d; the rank logs above say why.",
                     completed.returncode)
    return completed.returncode
