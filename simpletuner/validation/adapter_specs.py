"""Which extra LoRA adapters validation renders with: validation_adapter_path / _config -> adapter runs.

A run is one combination of adapters attached together for one set of renders;
``BASE_RUN`` (no adapters) renders the trained weights alone. With
validation_adapter_path the mode decides the runs: ``adapter_only`` renders
only the adapter run, ``comparison`` the base run and the adapter run side by
side, ``none`` only the base run. validation_adapter_config (inline JSON or a
JSON file) lists runs: a list, or an object with a "runs" list, whose entries
are a path string or an object with ``path`` and optionally ``label``,
``adapter_name``, ``strength``, or ``adapters``/``paths`` (several adapters
in one run). The base run comes first, then every configured run; the
single-adapter options are not used with it.

A location is a local ``.safetensors`` file, a local folder holding
``pytorch_lora_weights.safetensors``, or a Hugging Face repo id, optionally
``org/repo:weights.safetensors``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from simpletuner.config.errors import ConfigError

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
RESERVED_NAMES = ("default",)  # the trained PEFT adapter's name
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_]+")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class AdapterFile:
    location: str  # local file or folder, or hub repo id
    weight_name: str | None  # file inside a folder or repo; None for a local file
    adapter_name: str
    strength: float
    is_local: bool

    @property
    def local_file(self) -> str:
        if os.path.isdir(self.location):
            return os.path.join(self.location, self.weight_name or DEFAULT_WEIGHT_NAME)
        return self.location


@dataclass(frozen=True)
class AdapterRun:
    label: str  # "" for the base run
    adapters: tuple[AdapterFile, ...] = ()

    @property
    def is_base(self) -> bool:
        return not self.adapters


BASE_RUN = AdapterRun("")


def adapter_runs(settings) -> list[AdapterRun]:
    """The runs each validation round renders, in order; ``[BASE_RUN]`` when no adapter is configured."""
    if settings.validation_adapter_config:
        entries = _config_entries(settings.validation_adapter_config)
        runs = [_run_from_entry(entry, position) for position, entry in enumerate(entries, start=1)]
        return [BASE_RUN, *_unique_labels(runs)]
    path, mode = settings.validation_adapter_path, settings.validation_adapter_mode or "adapter_only"
    if not path or mode == "none":
        return [BASE_RUN]
    strength = _strength(settings.validation_adapter_strength, "validation_adapter_strength")
    name = settings.validation_adapter_name
    adapter = adapter_file(path, name, strength, "validation_adapter_path")
    run = AdapterRun(name or _stem(path), (adapter,))
    return [run] if mode == "adapter_only" else [BASE_RUN, run]


def adapter_file(location: str, name: str | None, strength: float, option: str) -> AdapterFile:
    """One adapter: where it is (local or hub) and the PEFT adapter name it is loaded under."""
    if not isinstance(location, str) or not location.strip():
        raise ConfigError(option, f"{option}: an adapter location must be a non-empty path or repo id, not "
                                  f"{location!r}.")
    location = os.path.expanduser(location.strip())
    adapter_name = _adapter_name(name or _stem(location), option)
    if os.path.exists(location):
        return AdapterFile(location, None if os.path.isfile(location) else DEFAULT_WEIGHT_NAME, adapter_name,
                           strength, True)
    repo, _, weight_name = location.partition(":") if not location.startswith(("/", ".")) else (location, "", "")
    if _HUB_ID.match(repo) and not repo.endswith(_WEIGHT_SUFFIXES):
        return AdapterFile(repo, weight_name or DEFAULT_WEIGHT_NAME, adapter_name, strength, False)
    raise ConfigError(option, f"{option}: {location!r} is neither an existing file or folder nor a Hugging Face "
                              "repo id (org/repo or org/repo:weights.safetensors). Fix the path.")


def _config_entries(value) -> list:
    option = "validation_adapter_config"
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and not text.startswith(("[", "{")):
        if not os.path.isfile(text):
            raise ConfigError(option, f"{option}={text!r}: no such file, and not inline JSON. Give a JSON file "
                                      "or inline JSON such as [{\"path\": \"my_lora.safetensors\"}].")
        with open(text, encoding="utf-8") as handle:
            text = handle.read()
    try:
        parsed = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as exc:
        raise ConfigError(option, f"{option}: not valid JSON at line {exc.lineno}, column {exc.colno}: "
                                  f"{exc.msg}.") from exc
    entries = parsed.get("runs") if isinstance(parsed, dict) and "runs" in parsed else parsed
    entries = [entries] if isinstance(entries, dict) else entries
    if not isinstance(entries, list) or not entries:
        raise ConfigError(option, f"{option}: expected a non-empty list of runs (or an object with a \"runs\" "
                                  "list), e.g. [{\"label\": \"style\", \"path\": \"style.safetensors\"}].")
    return entries


def _run_from_entry(entry, position: int) -> AdapterRun:
    option = "validation_adapter_config"
    where = f"{option} run {position}"
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict):
        raise ConfigError(option, f"{where}: expected a path string or an object with \"path\", not "
                                  f"{json.dumps(entry)}.")
    strength = _strength(entry.get("strength", entry.get("scale", 1.0)), f"{where} strength")
    listed = entry.get("adapters", entry.get("paths"))
    if listed is None:
        if "path" not in entry:
            raise ConfigError(option, f"{where} has no \"path\" (or \"adapters\" list): {json.dumps(entry)}.")
        listed = [{"path": entry["path"], "adapter_name": entry.get("adapter_name")}]
    if not isinstance(listed, list) or not listed:
        raise ConfigError(option, f"{where}: \"adapters\"/\"paths\" must be a non-empty list.")
    adapters = tuple(_listed_adapter(item, strength, where) for item in listed)
    names = [adapter.adapter_name for adapter in adapters]
    if len(set(names)) != len(names):
        raise ConfigError(option, f"{where} loads two adapters under one name ({names}); give each an "
                                  "\"adapter_name\".")
    label = entry.get("label") or entry.get("adapter_name") or adapters[0].adapter_name
    return AdapterRun(str(label), adapters)


def _listed_adapter(item, run_strength: float, where: str) -> AdapterFile:
    if isinstance(item, str):
        item = {"path": item}
    if not isinstance(item, dict) or "path" not in item:
        raise ConfigError("validation_adapter_config", f"{where}: each adapter needs a \"path\", got "
                                                       f"{json.dumps(item)}.")
    strength = _strength(item.get("strength", item.get("scale", run_strength)), f"{where} strength")
    return adapter_file(item["path"], item.get("adapter_name"), strength, "validation_adapter_config")


def _strength(value, where: str) -> float:
    option = where.split(" ")[0]
    try:
        strength = float(value)
    except (TypeError, ValueError):
        strength = float("nan")
    if not strength > 0:
        raise ConfigError(option, f"{where}={value!r} must be a number above 0 (1.0 applies the adapter as "
                                  "trained).")
    return strength


def _adapter_name(name: str, option: str) -> str:
    cleaned = _NAME_UNSAFE.sub("_", str(name)).strip("_") or "adapter"
    if cleaned in RESERVED_NAMES:
        raise ConfigError(option, f"{option}: the adapter name {name!r} is the trained adapter's own name; "
                                  "choose another adapter_name.")
    return cleaned


def _stem(location: str) -> str:
    base = location.rstrip("/").split(":")[-1] if ":" in location else location.rstrip("/")
    stem = os.path.splitext(os.path.basename(base))[0]
    if stem == os.path.splitext(DEFAULT_WEIGHT_NAME)[0]:
        stem = os.path.basename(os.path.dirname(base)) or stem
    return stem or "adapter"


def _unique_labels(runs: list[AdapterRun]) -> list[AdapterRun]:
    seen: set[str] = set()
    unique = []
    for run in runs:
        label, counter = run.label, 2
        while label in seen:
            label, counter = f"{run.label}_{counter}", counter + 1
        seen.add(label)
        unique.append(AdapterRun(label, run.adapters))
    return unique
