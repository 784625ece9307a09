"""Reading raw settings from the places users keep them.

Each reader returns ``{key: raw value}`` with keys as the user wrote them
(with or without leading dashes); typing and validation happen in loader.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from typing import Any, Mapping

from simpletuner.config.errors import ConfigError

# Variables the reference documents for config.env and the process environment.
ENVIRONMENT_OPTIONS = {
    "TRAINING_NUM_PROCESSES": "num_processes",
    "TRAINING_NUM_MACHINES": "num_machines",
    "TRAINING_DYNAMO_BACKEND": "dynamo_backend",
    "MIXED_PRECISION": "mixed_precision",
}

# Older config.env files name some options differently.
LEGACY_ENV_NAMES = {
    "MODEL_NAME": "pretrained_model_name_or_path",
    "BASE_DIR": None,  # only used for ${BASE_DIR} expansion
    "INSTANCE_DIR": None,
    "USE_GRADIENT_CHECKPOINTING": "gradient_checkpointing",
    "USE_DORA": "use_dora",
    "USE_EMA": "use_ema",
    "DATALOADER_CONFIG": "data_backend_config",
    "CHECKPOINTING_STEPS": "checkpoint_step_interval",
    "VALIDATION_STEPS": "validation_step_interval",
    "TRACKER_PROJECT_NAME": "tracker_project_name",
    "TRACKER_RUN_NAME": "tracker_run_name",
    "LR_SCHEDULE": "lr_scheduler",
    "LR_WARMUP_STEPS": "lr_warmup_steps",
    "MAX_NUM_STEPS": "max_train_steps",
    "NUM_EPOCHS": "num_train_epochs",
    "OPTIMIZER": "optimizer",
}

# Variables that steer the launcher or logging rather than a training option.
LAUNCHER_VARIABLES = {"ACCELERATE_EXTRA_ARGS", "SIMPLETUNER_LOG_LEVEL", "VENV_PATH", "TRAINER_EXTRA_ARGS",
                      "USE_BITFIT", "CONFIG_BACKEND", "CONFIG_PATH", "ENV"}


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise ConfigError(path, f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}. "
                                "Fix the syntax there (a missing comma or quote is the usual cause).") from None
    if not isinstance(data, dict):
        raise ConfigError(path, f"{path} must hold one JSON object of option names and values, not a {type(data).__name__}.")
    return data


def read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"{path} is not valid TOML: {exc}. Fix the syntax at that line.") from None
    return _flatten_toml(data)


def _flatten_toml(data: dict[str, Any]) -> dict[str, Any]:
    """Tables are allowed for grouping only: their keys are option names themselves."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten_toml(value))
        else:
            flat[key] = value
    return flat


_ASSIGNMENT = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def read_env_file(path: str, environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Parse a shell-style config.env. Returns (options, extra_args) where extra_args come from TRAINER_EXTRA_ARGS."""
    variables = read_env_variables(path, environ)
    options: dict[str, Any] = {}
    extra_args: list[str] = shlex.split(variables.pop("TRAINER_EXTRA_ARGS", ""))
    for name, value in variables.items():
        option = env_variable_option(name)
        if option:
            options[option] = value
    return options, extra_args


def read_env_variables(path: str, environ: Mapping[str, str]) -> dict[str, str]:
    """Every NAME=value assignment of a config.env, expanded, its words joined by single spaces."""
    variables: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            match = _ASSIGNMENT.match(stripped)
            if not match:
                raise ConfigError(path, f"{path} line {number}: expected NAME=value or export NAME=value, got {stripped!r}.")
            name, raw = match.groups()
            try:
                words = shlex.split(_expand(raw, {**environ, **variables}), comments=True)
            except ValueError as exc:
                raise ConfigError(path, f"{path} line {number}: {exc} (check the quotes).") from None
            variables[name] = " ".join(words)
    return variables


def launcher_variable(name: str, config_path: str | None, environ: Mapping[str, str]) -> str:
    """A launcher variable such as ACCELERATE_EXTRA_ARGS: from the environment, else from a config.env file."""
    if environ.get(name, "") != "":
        return environ[name]
    if config_path and config_path.endswith(".env") and os.path.isfile(config_path):
        return read_env_variables(config_path, environ).get(name, "")
    return ""


def _expand(raw: str, variables: Mapping[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: variables.get(m.group(1), ""), raw)


def env_variable_option(name: str) -> str | None:
    """The option a config.env variable sets, or None for launcher/unknown variables."""
    from simpletuner.config.options import canonical_name

    if name in ENVIRONMENT_OPTIONS:
        return ENVIRONMENT_OPTIONS[name]
    if name in LEGACY_ENV_NAMES:
        return LEGACY_ENV_NAMES[name]
    if name in LAUNCHER_VARIABLES:
        return None
    return canonical_name(name.lower())


def environment_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Options set through the documented process environment variables."""
    return {option: environ[name] for name, option in ENVIRONMENT_OPTIONS.items() if environ.get(name, "") != ""}


def split_cli_args(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``--key=value``, ``--key value`` and bare ``--flag`` -> {key: raw}. Returns (values, leftovers)."""
    values: dict[str, Any] = {}
    leftovers: list[str] = []
    index = 0
    while index < len(argv):
        word = argv[index]
        index += 1
        if not word.startswith("--"):
            leftovers.append(word)
            continue
        key, has_value, value = word[2:].partition("=")
        if has_value:
            values[key] = value
        elif index < len(argv) and not argv[index].startswith("--") and not _is_bool_option(key):
            values[key] = argv[index]
            index += 1
        elif index < len(argv) and _is_bool_option(key) and argv[index].lower() in ("true", "false", "1", "0", "yes", "no"):
            values[key] = argv[index]
            index += 1
        else:
            values[key] = True
    return values, leftovers


def _is_bool_option(key: str) -> bool:
    from simpletuner.config.options import OPTIONS, canonical_name

    name = canonical_name(key)
    return name is not None and OPTIONS[name].kind == "bool"


def file_exists(path: str) -> bool:
    return os.path.isfile(path)
