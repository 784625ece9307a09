"""multidatabackend.json -> validated ``DatasetSpec`` entries.

Each entry of the JSON list becomes one ``DatasetSpec`` whose attributes carry
the JSON keys' own names. Values the user left out are filled from the global
settings where the reference says a dataset falls back to them (resolution,
caption strategy, instance prompt, size limits, cache folders, ...), so code
further down reads only the spec.

Every problem found in the file is collected and raised together as one
``DatasetConfigError`` whose lines name the file, the dataset and the key and
say how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
from typing import Any

from simpletuner.config.errors import ConfigError
from simpletuner.data.conditioning_config import CONDITIONING, check_conditioning
from simpletuner.data.dataset_spec import KEY_ALIASES, KEYS, PARQUET_KEYS, PATH_KEYS, VALUE_ALIASES, SHUFFLE_KEYS, DatasetSpec

__all__ = ["DatasetConfigError", "DatasetSpec", "load_dataset_config", "enabled_datasets", "training_datasets",
           "eval_datasets", "find_dataset", "default_text_embeds", "IMPLICIT_TEXT_EMBEDS_ID"]

logger = logging.getLogger("simpletuner.data")

IMPLICIT_TEXT_EMBEDS_ID = "default-text-embeds"
SKIP_DISCOVERY_STAGES = ("aspect", "metadata", "text", "vae")
PRIMARY_DATASET_TYPES = ("image", "eval")  # datasets discovery reads images from


class DatasetConfigError(ConfigError):
    """One or more problems in a dataset configuration file; ``problems`` holds one line each."""

    def __init__(self, problems: list[str], key: str = "data_backend_config"):
        self.problems = list(problems)
        super().__init__(key, "\n".join(self.problems))


def _setting(settings, name: str, default: Any = None) -> Any:
    value = getattr(settings, name, default)
    return default if value is None else value


class _Problems:
    """Collects the messages for one config file."""

    def __init__(self, path: str):
        self.path = path
        self.lines: list[str] = []

    def add(self, label: str, key: str | None, message: str) -> None:
        where = f"{self.path}: {label}" + (f": {key}" if key else "")
        self.lines.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise DatasetConfigError(self.lines)


class _BadValue(Exception):
    pass


def load_dataset_config(path: str, settings) -> list[DatasetSpec]:
    """Read and validate a multidatabackend.json file.

    Returns every entry (disabled ones too, with ``disabled=True``) in file
    order. SimpleTuner needs one default ``text_embeds`` dataset: when the
    file has none, an implicit local one with id ``default-text-embeds`` is
    appended, storing its cache under ``--cache_dir_text`` (when set) or
    ``<cache_dir or 'cache'>/text``; it is logged and marked ``implicit``.
    Image datasets without ``text_embeds`` get the default one's id.
    """
    entries = _read_json_list(path)
    problems = _Problems(path)
    specs: list[DatasetSpec] = []
    for position, entry in enumerate(entries, start=1):
        spec = _parse_entry(entry, position, settings, problems)
        if spec is not None:
            specs.append(spec)
    problems.raise_if_any()
    _check_unique_ids(specs, problems)
    if not training_datasets(specs):
        problems.lines.append(f"{path}: no enabled image dataset (dataset_type \"image\"); add one or enable one, "
                              "e.g. {\"id\": \"photos\", \"type\": \"local\", \"instance_data_dir\": \"datasets/photos\"}.")
    for spec in specs:
        if not spec.disabled:
            _check_dataset(spec, problems)
    problems.raise_if_any()
    specs = _link_text_embeds(specs, settings, problems)
    _check_links(specs, problems)
    check_conditioning(specs, settings, problems)
    problems.raise_if_any()
    return specs


def _read_json_list(path: str) -> list:
    if not os.path.isfile(path):
        raise DatasetConfigError([f"{path}: dataset config file not found. Check --data_backend_config."])
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DatasetConfigError([
            f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}. "
            "Check for a trailing comma or a missing quote near that spot."
        ]) from exc
    if not isinstance(data, list):
        raise DatasetConfigError([f"{path}: the file must hold a JSON list of datasets ([{{...}}, ...]), "
                                  f"not a {type(data).__name__}."])
    if not data:
        raise DatasetConfigError([f"{path}: the dataset list is empty; add at least one image dataset."])
    return data


def _parse_entry(entry: Any, position: int, settings, problems: _Problems) -> DatasetSpec | None:
    if not isinstance(entry, dict):
        problems.add(f"entry #{position}", None, f"each dataset must be a JSON object, not {type(entry).__name__}.")
        return None
    raw_id = entry.get("id")
    if not isinstance(raw_id, str) or not raw_id.strip():
        problems.add(f"entry #{position}", "id", "every dataset needs a non-empty string id; add \"id\": \"my-dataset\".")
        return None
    label = f"dataset '{raw_id}'"
    values: dict[str, Any] = {}
    for raw_key, raw_value in entry.items():
        key = KEY_ALIASES.get(raw_key, raw_key)
        if key not in KEYS:
            problems.add(label, raw_key, f"unknown key{_suggestion(raw_key)}. Remove it or fix its spelling.")
            continue
        if key in values and values[key] != raw_value:
            problems.add(label, raw_key, f"given twice (as '{key}' and an alternative spelling) with different values; "
                                         "keep one.")
            continue
        try:
            parsed = _parse_value(key, raw_value)
        except _BadValue as exc:
            problems.add(label, raw_key, str(exc))
            continue
        if parsed is not None:
            values[key] = parsed
    disabled = bool(values.get("disabled", False))
    if not disabled:
        _check_planned(values, label, problems)
    try:
        values = _substitute_placeholders(values, settings)
    except _BadValue as exc:
        problems.add(label, None, str(exc))
        return None
    return _build_spec(values, settings, problems.path)


def _suggestion(key: str) -> str:
    close = difflib.get_close_matches(key, list(KEYS) + list(KEY_ALIASES), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _parse_value(key: str, value: Any) -> Any:
    """Convert one JSON value to the key's kind; None means 'not set'. Raises _BadValue."""
    spec = KEYS[key]
    if value is None:
        return None
    kind = spec.kind
    if kind in ("str", "path"):
        if not isinstance(value, str):
            raise _BadValue(f"expected a string, got {json.dumps(value)}.")
        value = VALUE_ALIASES.get(key, {}).get(value, value)
        if spec.choices:
            _check_choice(value, spec.choices)
        return os.path.expanduser(value) if kind == "path" and value else value
    if kind == "bool":
        return _parse_bool(value)
    if kind in ("int", "number"):
        number = _parse_number(value, integer=kind == "int")
        if spec.low is not None and number < spec.low:
            raise _BadValue(f"must be at least {spec.low:g}, got {value!r}.")
        if spec.high is not None and number > spec.high:
            raise _BadValue(f"must be at most {spec.high:g}, got {value!r}.")
        return number
    if kind == "numbers":
        if not isinstance(value, list) or not value:
            raise _BadValue(f"expected a non-empty list of aspect ratios such as [0.75, 1.0, 1.5], got {json.dumps(value)}.")
        numbers = tuple(_parse_number(item, integer=False) for item in value)
        if any(n <= 0 for n in numbers):
            raise _BadValue("aspect ratios must be greater than 0.")
        return numbers
    if kind == "ids":
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise _BadValue("expected a dataset id or a list of dataset ids.")
    if kind == "mapping":
        if not isinstance(value, dict):
            raise _BadValue(f"expected a JSON object {{...}}, got {json.dumps(value)}.")
        return dict(value)
    if kind == "filter_list":
        if isinstance(value, str):
            return os.path.expanduser(value)
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise _BadValue("expected a list of filter strings or the path of a .txt or .json filter file.")
    return value  # "any"


def _check_choice(value: str, choices: tuple) -> None:
    if value in choices:
        return
    if "|" in value and all(part in choices for part in value.split("|")):
        raise _BadValue(f"{value!r} lists several choices, as the example file does to show them; "
                        f"keep exactly one of: {', '.join(choices)}.")
    raise _BadValue(f"{value!r} is not one of: {', '.join(choices)}.")


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _BadValue(f"expected true or false, got {json.dumps(value)}.")


def _parse_number(value: Any, integer: bool) -> float | int:
    if isinstance(value, bool):
        raise _BadValue(f"expected a number, got {json.dumps(value)}.")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError as exc:
            raise _BadValue(f"expected a number, got {value!r}.") from exc
    if not isinstance(value, (int, float)):
        raise _BadValue(f"expected a number, got {json.dumps(value)}.")
    if integer:
        if float(value) != int(value):
            raise _BadValue(f"expected a whole number, got {value!r}.")
        return int(value)
    return value


def _check_planned(values: dict[str, Any], label: str, problems: _Problems) -> None:
    for key, value in values.items():
        spec = KEYS[key]
        if spec.planned and value != spec.default:
            problems.add(label, None, f"{key} is not implemented yet (got {_short(value)}); remove it to continue.")
        elif value in spec.planned_choices:
            problems.add(label, None, f"{key} is not implemented yet for the value {value!r}; "
                                      f"choose one of: {', '.join(c for c in spec.choices if c not in spec.planned_choices)}.")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, tuple) else json.dumps(list(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _substitute_placeholders(values: dict[str, Any], settings) -> dict[str, Any]:
    """Replace '{model_family}' in path values, as the reference examples use it."""
    for key in PATH_KEYS:
        text = values.get(key)
        if isinstance(text, str) and "{model_family}" in text:
            family = _setting(settings, "model_family")
            if not family:
                raise _BadValue(f"{key} uses {{model_family}} but --model_family is not set; set it or write the "
                                "folder name out.")
            values[key] = text.replace("{model_family}", str(family))
    return values


def _build_spec(values: dict[str, Any], settings, config_file: str) -> DatasetSpec:
    explicit = frozenset(values)
    resolved = dict(values)

    def fallback(key: str, option: str | None = None, default: Any = None) -> None:
        if resolved.get(key) is None:
            resolved[key] = _setting(settings, option or key, default)

    fallback("resolution", default=1024)
    fallback("resolution_type", default="pixel_area")
    for key in ("minimum_image_size", "maximum_image_size", "target_downsample_size", "max_upscale_threshold",
                "instance_prompt", "metadata_update_interval", "write_batch_size"):
        fallback(key)
    fallback("caption_strategy", default="filename")
    if resolved["caption_strategy"] == "instance_prompt":
        resolved["caption_strategy"] = "instanceprompt"
    for key in ("prepend_instance_prompt", "only_instance_prompt", "delete_unwanted_images",
                "delete_problematic_images", "preserve_data_backend_cache"):
        fallback(key, default=False)
    resolved["skip_file_discovery"] = _skip_stages(values.get("skip_file_discovery", ""),
                                                   _setting(settings, "skip_file_discovery", ""))
    if resolved.get("vae_cache_clear_each_epoch") is None:
        randomised = resolved.get("crop", False) and (
            resolved.get("crop_aspect", "square") == "random" or resolved.get("crop_style", "random") == "random")
        resolved["vae_cache_clear_each_epoch"] = bool(randomised)
    _resolve_cache_folders(resolved, settings)
    if resolved.get("parquet") is not None:
        parquet = dict(resolved["parquet"])
        parquet.setdefault("caption_column", _setting(settings, "parquet_caption_column", "caption"))
        parquet.setdefault("filename_column", _setting(settings, "parquet_filename_column", "id"))
        resolved["parquet"] = parquet
    resolved.update(
        aspect_bucket_alignment=int(_setting(settings, "aspect_bucket_alignment", 64)),
        aspect_bucket_rounding=int(_setting(settings, "aspect_bucket_rounding", 2)),
        compress_disk_cache=bool(_setting(settings, "compress_disk_cache", False)),
        seed=int(_setting(settings, "seed", 0)),
        config_file=config_file,
        explicit_keys=explicit,
    )
    return DatasetSpec(**{k: v for k, v in resolved.items() if v is not None})


def _skip_stages(own: str, global_value: str) -> tuple[str, ...]:
    words = f"{own or ''} {global_value or ''}".replace(",", " ").split()
    return tuple(sorted(set(words)))


def _resolve_cache_folders(resolved: dict[str, Any], settings) -> None:
    dataset_type = resolved.get("dataset_type", "image")
    base = _setting(settings, "cache_dir") or "cache"
    if dataset_type == "text_embeds" and resolved.get("cache_dir") is None:
        resolved["cache_dir"] = _text_cache_default(settings)
    if dataset_type in (*PRIMARY_DATASET_TYPES, CONDITIONING) and resolved.get("cache_dir_vae") is None:
        global_vae = _setting(settings, "cache_dir_vae", "")
        root = global_vae if global_vae else os.path.join(base, "vae")
        resolved["cache_dir_vae"] = os.path.join(root, _safe_name(resolved["id"]))


def _text_cache_default(settings) -> str:
    if hasattr(settings, "is_set") and settings.is_set("cache_dir_text"):
        return settings.cache_dir_text
    return os.path.join(_setting(settings, "cache_dir") or "cache", "text")


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _check_unique_ids(specs: list[DatasetSpec], problems: _Problems) -> None:
    seen: set[str] = set()
    for spec in specs:
        if spec.id in seen:
            problems.add(f"dataset '{spec.id}'", "id", "is used by more than one dataset; every id must be unique.")
        seen.add(spec.id)
    problems.raise_if_any()


def _check_dataset(spec: DatasetSpec, problems: _Problems) -> None:
    """Rules within one enabled dataset."""
    label = f"dataset '{spec.id}'"
    add = lambda key, message: problems.add(label, key, message)  # noqa: E731
    if spec.type == "aws" and not spec.aws_bucket_name:
        add("aws_bucket_name", "is required for \"type\": \"aws\"; give the bucket's name.")
    if spec.dataset_type in PRIMARY_DATASET_TYPES:
        _check_image_dataset(spec, add)
    if spec.dataset_type == "text_embeds" and spec.type == "local" and not spec.cache_dir:
        add("cache_dir", "is empty; give the folder where this dataset stores text embeddings.")
    if spec.caption_filter_list is not None and isinstance(spec.caption_filter_list, str):
        if not os.path.isfile(spec.caption_filter_list):
            add("caption_filter_list", f"file {spec.caption_filter_list!r} not found; fix the path or give the "
                                       "filters as a JSON list.")
    unknown = [s for s in spec.skip_file_discovery if s not in SKIP_DISCOVERY_STAGES]
    if unknown:
        add("skip_file_discovery", f"unknown stage(s) {', '.join(unknown)}; use any of "
                                   f"{', '.join(SKIP_DISCOVERY_STAGES)} separated by commas or spaces.")
    if spec.hash_filenames is not None:
        logger.info("%s: hash_filenames is ignored; cache file names are always hashed.", spec.where())


def _check_image_dataset(spec: DatasetSpec, add) -> None:
    if spec.type == "local":
        if not spec.instance_data_dir:
            add("instance_data_dir", "is required for a local image dataset; give the folder holding the images.")
        elif not os.path.isdir(spec.instance_data_dir):
            add("instance_data_dir", f"folder {spec.instance_data_dir!r} does not exist; fix the path.")
    _check_sizes(spec, add)
    if spec.crop_aspect == "random" and spec.crop and not spec.crop_aspect_buckets:
        add("crop_aspect_buckets", "crop_aspect \"random\" needs a list of aspect ratios to pick from, "
                                   "e.g. \"crop_aspect_buckets\": [0.75, 1.0, 1.5].")
    if (spec.minimum_aspect_ratio and spec.maximum_aspect_ratio
            and spec.minimum_aspect_ratio > spec.maximum_aspect_ratio):
        add("minimum_aspect_ratio", f"{spec.minimum_aspect_ratio} is above maximum_aspect_ratio "
                                    f"{spec.maximum_aspect_ratio}; swap them.")
    needs_prompt = spec.caption_strategy == "instanceprompt" or spec.only_instance_prompt or spec.prepend_instance_prompt
    if needs_prompt and not spec.instance_prompt:
        reason = ("caption_strategy \"instanceprompt\"" if spec.caption_strategy == "instanceprompt"
                  else "only_instance_prompt" if spec.only_instance_prompt else "prepend_instance_prompt")
        add("instance_prompt", f"is required by {reason}; set \"instance_prompt\" to the words to use.")
    if spec.caption_strategy == "parquet":
        if not spec.parquet or not spec.parquet.get("path"):
            add("parquet", "caption_strategy \"parquet\" needs a \"parquet\" block with at least \"path\" "
                           "(and usually filename_column and caption_column).")
    if spec.parquet:
        unknown = [k for k in spec.parquet if k not in PARQUET_KEYS]
        if unknown:
            add("parquet", f"unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(PARQUET_KEYS)}.")
    if spec.caption_shuffle:
        unknown = [k for k in spec.caption_shuffle if k not in SHUFFLE_KEYS]
        split_on = spec.caption_shuffle.get("split_on", "comma")
        if unknown:
            add("caption_shuffle", f"unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(SHUFFLE_KEYS)}.")
        if split_on not in ("comma", "space", "period"):
            add("caption_shuffle", f"split_on {split_on!r} must be one of comma, space, period.")
    if spec.maximum_image_size and not spec.target_downsample_size:
        logger.warning("%s: maximum_image_size has no effect without target_downsample_size.", spec.where())


def _check_sizes(spec: DatasetSpec, add) -> None:
    """Catch a size written in the wrong unit for resolution_type."""
    sizes = {"resolution": spec.resolution, "minimum_image_size": spec.minimum_image_size,
             "maximum_image_size": spec.maximum_image_size, "target_downsample_size": spec.target_downsample_size}
    for key, value in sizes.items():
        if not value:
            if key == "resolution":
                add(key, "must be greater than 0.")
            continue
        if spec.resolution_type == "area" and value > 100:
            add(key, f"{value:g} megapixels is far too large for resolution_type \"area\"; use "
                     "resolution_type \"pixel_area\" to give sizes in pixels.")
        elif spec.resolution_type != "area" and key != "minimum_image_size" and value < 8:
            add(key, f"{value:g} pixels is too small for resolution_type {spec.resolution_type!r}; "
                     "use resolution_type \"area\" to give sizes in megapixels.")


def _link_text_embeds(specs: list[DatasetSpec], settings, problems: _Problems) -> list[DatasetSpec]:
    """Make sure exactly one enabled text_embeds dataset is the default and point image datasets at it."""
    text_specs = [s for s in specs if s.dataset_type == "text_embeds" and not s.disabled]
    defaults = [s for s in text_specs if s.default]
    if len(defaults) > 1:
        ids = ", ".join(repr(s.id) for s in defaults)
        problems.add(f"datasets {ids}", "default", "only one text_embeds dataset may be the default; set "
                                                   "\"default\": false on all but one.")
        problems.raise_if_any()
    if not text_specs:
        implicit = _implicit_text_embeds(specs, settings, problems.path)
        logger.info("%s: no text_embeds dataset is configured; text embeddings go to %s (dataset '%s').",
                    problems.path, implicit.cache_dir, implicit.id)
        specs = specs + [implicit]
        default_id = implicit.id
    elif defaults:
        default_id = defaults[0].id
    elif len(text_specs) == 1:
        default_id = text_specs[0].id
        specs = [dataclasses.replace(s, default=True) if s.id == default_id else s for s in specs]
    else:
        ids = ", ".join(repr(s.id) for s in text_specs)
        problems.add(f"datasets {ids}", "default", "several text_embeds datasets but none is the default; set "
                                                   "\"default\": true on one of them.")
        problems.raise_if_any()
    return [dataclasses.replace(s, text_embeds=default_id)
            if s.dataset_type in PRIMARY_DATASET_TYPES and not s.text_embeds else s for s in specs]


def _implicit_text_embeds(specs: list[DatasetSpec], settings, config_file: str) -> DatasetSpec:
    taken = {s.id for s in specs}
    name, number = IMPLICIT_TEXT_EMBEDS_ID, 2
    while name in taken:
        name, number = f"{IMPLICIT_TEXT_EMBEDS_ID}-{number}", number + 1
    values = {"id": name, "dataset_type": "text_embeds", "default": True, "cache_dir": _text_cache_default(settings)}
    spec = _build_spec(values, settings, config_file)
    return dataclasses.replace(spec, implicit=True, explicit_keys=frozenset())


def _check_links(specs: list[DatasetSpec], problems: _Problems) -> None:
    by_id = {s.id: s for s in specs}
    for spec in specs:
        if spec.disabled or spec.dataset_type not in PRIMARY_DATASET_TYPES:
            continue
        for key, wanted in (("text_embeds", "text_embeds"), ("image_embeds", "image_embeds")):
            target_id = getattr(spec, key)
            if not target_id:
                continue
            target = by_id.get(target_id)
            if target is None:
                problems.add(f"dataset '{spec.id}'", key, f"no dataset has the id {target_id!r}; "
                                                          f"use the id of a {wanted} dataset.")
            elif target.disabled:
                problems.add(f"dataset '{spec.id}'", key, f"dataset {target_id!r} is disabled; enable it or "
                                                          "point to another one.")
            elif target.dataset_type != wanted:
                problems.add(f"dataset '{spec.id}'", key, f"dataset {target_id!r} has dataset_type "
                                                          f"{target.dataset_type!r}, not {wanted!r}.")


def enabled_datasets(specs: list[DatasetSpec]) -> list[DatasetSpec]:
    return [s for s in specs if not s.disabled]


def training_datasets(specs: list[DatasetSpec]) -> list[DatasetSpec]:
    """Enabled image datasets the sampler draws training samples from (not eval, not embed stores)."""
    return [s for s in specs if not s.disabled and s.dataset_type == "image"]


def eval_datasets(specs: list[DatasetSpec]) -> list[DatasetSpec]:
    return [s for s in specs if not s.disabled and s.dataset_type == "eval"]


def find_dataset(specs: list[DatasetSpec], dataset_id: str) -> DatasetSpec:
    for spec in specs:
        if spec.id == dataset_id:
            return spec
    raise KeyError(f"no dataset with id {dataset_id!r}")


def default_text_embeds(specs: list[DatasetSpec]) -> DatasetSpec:
    for spec in specs:
        if spec.dataset_type == "text_embeds" and spec.default and not spec.disabled:
            return spec
    raise KeyError("no default text_embeds dataset (load_dataset_config always provides one)")
