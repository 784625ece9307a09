"""Where the configuration comes from, and in which order sources win.

Precedence: option defaults < config file < environment variables < command line.
The config file is chosen, in order, by ``--example NAME`` / ``example=NAME``,
``--env NAME`` / ``env=NAME`` / ``$ENV`` (config/NAME/config.json|toml|env),
``$CONFIG_BACKEND`` with ``$CONFIG_PATH``, and finally config/config.json.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from simpletuner.config import sources
from simpletuner.config.errors import ConfigError, ConfigErrors
from simpletuner.config.settings import Settings
from simpletuner.config.values import convert, suggest_option

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
FILE_NAMES = ("config.json", "config.toml", "config.env")
BACKEND_EXTENSIONS = {"json": ".json", "toml": ".toml", "env": ".env"}
# Options naming companion files; in a shipped example they are found beside its config.
COMPANION_FILE_OPTIONS = ("data_backend_config", "lycoris_config", "user_prompt_library", "webhook_config",
                          "publishing_config", "controlnet_custom_config", "tread_config", "validation_adapter_config")


@dataclass
class Selection:
    env: str | None = None
    example: str | None = None


@dataclass
class LoadedConfig:
    settings: Settings
    config_path: str | None
    sources: dict[str, str] = field(default_factory=dict)  # option -> where its value came from


def split_selection(argv: list[str]) -> tuple[Selection, list[str]]:
    """Pull ``--env``/``env=`` and ``--example``/``example=`` out of argv."""
    selection = Selection()
    rest: list[str] = []
    index = 0
    while index < len(argv):
        word = argv[index]
        index += 1
        for name in ("env", "example"):
            if word in (f"--{name}",) and index < len(argv):
                setattr(selection, name, argv[index])
                index += 1
                break
            if word.startswith((f"--{name}=", f"{name}=")):
                setattr(selection, name, word.split("=", 1)[1])
                break
        else:
            rest.append(word)
    return selection, rest


def example_names() -> list[str]:
    if not EXAMPLES_DIR.is_dir():
        return []
    return sorted(p.name for p in EXAMPLES_DIR.iterdir() if p.is_dir() and any((p / f).exists() for f in FILE_NAMES))


def locate_config(selection: Selection, environ: Mapping[str, str], cwd: str) -> tuple[str | None, str]:
    """(path or None, backend) for the chosen config file."""
    if selection.example:
        folder = EXAMPLES_DIR / selection.example
        path = _first_existing(str(folder))
        if path is None:
            raise ConfigError("example", f"There is no example named {selection.example!r}. "
                                         f"Available examples: {', '.join(example_names()) or 'none'}. "
                                         "Run `simpletuner examples list` to see them.")
        return path, _backend_of(path)
    env_name = selection.env or environ.get("ENV")
    if env_name:
        folder = os.path.join(cwd, "config", env_name)
        path = _first_existing(folder)
        if path is None:
            raise ConfigError("env", f"Config environment {env_name!r} has no config file: looked for "
                                     f"{', '.join(os.path.join(folder, f) for f in FILE_NAMES)}. "
                                     "Create one with `simpletuner configure` or fix the env name.")
        return path, _backend_of(path)
    backend = environ.get("CONFIG_BACKEND", "").strip().lower()
    if backend:
        return _from_backend(backend, environ.get("CONFIG_PATH", ""), cwd)
    return _first_existing(os.path.join(cwd, "config")), "json"


def _from_backend(backend: str, config_path: str, cwd: str) -> tuple[str | None, str]:
    if backend == "cmd":
        return None, "cmd"
    if backend not in BACKEND_EXTENSIONS:
        raise ConfigError("CONFIG_BACKEND", f"CONFIG_BACKEND={backend!r} is not supported; use json, toml, env or cmd.")
    path = config_path or os.path.join("config", "config")
    if not os.path.splitext(path)[1]:
        path += BACKEND_EXTENSIONS[backend]
    path = os.path.join(cwd, path)
    if not os.path.isfile(path):
        raise ConfigError("CONFIG_PATH", f"CONFIG_BACKEND={backend} points at {path}, which does not exist. "
                                         "Set CONFIG_PATH to your config file (with or without its extension).")
    return path, backend


def _first_existing(folder: str) -> str | None:
    for name in FILE_NAMES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _backend_of(path: str) -> str:
    return os.path.splitext(path)[1].lstrip(".")


def read_config_file(path: str, backend: str, environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    if backend == "json":
        return sources.read_json(path), []
    if backend == "toml":
        return sources.read_toml(path), []
    return sources.read_env_file(path, environ)


def _resolve_companions(values: dict[str, Any], folder: str) -> dict[str, Any]:
    resolved = dict(values)
    for key, value in values.items():
        if key.lstrip("-") in COMPANION_FILE_OPTIONS and isinstance(value, str) and not os.path.isabs(value):
            beside = os.path.join(folder, value)
            if os.path.exists(beside):
                resolved[key] = beside
    return resolved


def typed_layer(raw: Mapping[str, Any], source: str, errors: list[ConfigError]) -> dict[str, Any]:
    """Canonical option names -> typed values; problems are appended to errors."""
    from simpletuner.config.options import OPTIONS, canonical_name

    typed: dict[str, Any] = {}
    for key, value in raw.items():
        name = canonical_name(key)
        if name is None:
            bare = key.lstrip("-")
            errors.append(ConfigError(bare, f"{bare}: unknown option in {source}.{suggest_option(bare, list(OPTIONS))} "
                                            "Remove it or fix its spelling (`simpletuner train --help` lists every option)."))
            continue
        try:
            typed[name] = convert(OPTIONS[name], value, source)
        except ConfigError as exc:
            errors.append(exc)
    return typed


def load_config(argv: list[str], environ: Mapping[str, str] | None = None, cwd: str | None = None) -> LoadedConfig:
    """Resolve every source into Settings. Raises ConfigErrors listing every problem found."""
    environ = os.environ if environ is None else environ
    cwd = cwd or os.getcwd()
    selection, rest = split_selection(argv)
    path, backend = locate_config(selection, environ, cwd)
    file_values: dict[str, Any] = {}
    extra_args: list[str] = []
    if path is not None:
        file_values, extra_args = read_config_file(path, backend, environ)
    if selection.example and path is not None:
        file_values = _resolve_companions(file_values, os.path.dirname(path))
    cli_values, leftovers = sources.split_cli_args(extra_args + rest)
    errors: list[ConfigError] = []
    for word in leftovers:
        errors.append(ConfigError(word, f"Unexpected argument {word!r}: options are written --name=value "
                                        "(or name=value for env= and example=)."))
    layers = [
        (path or "defaults", file_values),
        ("the environment", sources.environment_overrides(environ)),
        ("the command line", cli_values),
    ]
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, raw in layers:
        for name, value in typed_layer(raw, source, errors).items():
            merged[name] = value
            origin[name] = source
    ConfigErrors.raise_if_any(errors)
    return LoadedConfig(settings=Settings(merged), config_path=path, sources=origin)
