"""Which loaded component gets which quantisation, before anything is loaded.

A component is the denoiser (named like its folder: ``unet`` or ``transformer``) or a text encoder
(named like its pipeline attribute: ``text_encoder``, ``text_encoder_2``, ...). Its quantisation comes
from its precision option (base_model_precision, text_encoder_N_precision), a preset per level, and
with quantize_via=pipeline from quantization_config, which overrides it per component:

- inline JSON or the path of a JSON file, an object keyed by component name or ``default`` (used for
  every component without an entry of its own);
- each entry is an object of quantisation-config keywords. ``quant_method`` (bitsandbytes, quanto or
  torchao) names the backend; without it the backend is the precision level's, or is read from the
  keys (load_in_4bit / bnb_* -> bitsandbytes, weights_dtype -> quanto, quant_type -> torchao). An entry
  for the level's backend is merged into the level's preset; one for another backend replaces it;
- torchao's ``quant_type`` is a torchao.quantization config class name ("Int8WeightOnlyConfig") or an
  object of that class's arguments, with an optional ``"type"`` naming the class (default: the level's).

This module reads settings only (no torch); load_quantization.py builds the library objects.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from simpletuner.config.errors import ConfigError

OPTION = "quantization_config"
NO_CHANGE = "no_change"
DEFAULT_ENTRY = "default"
BACKENDS = ("bitsandbytes", "quanto", "torchao")
# Keys (or key prefixes) that identify a backend when an entry does not name one.
_BACKEND_KEYS = {
    "bitsandbytes": ("load_in_4bit", "load_in_8bit", "bnb_", "llm_int8_"),
    "quanto": ("weights_dtype", "weights", "activations"),
    "torchao": ("quant_type",),
}
# level -> (backend, preset keywords). fp8uz-quanto has no loader spelling: diffusers and transformers
# only know float8 (e4m3fn) weights, so through the loader it stores float8 as the reference documents.
LEVEL_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "int8-quanto": ("quanto", {"weights_dtype": "int8"}),
    "int4-quanto": ("quanto", {"weights_dtype": "int4"}),
    "int2-quanto": ("quanto", {"weights_dtype": "int2"}),
    "fp8-quanto": ("quanto", {"weights_dtype": "float8"}),
    "fp8uz-quanto": ("quanto", {"weights_dtype": "float8"}),
    "int8-torchao": ("torchao", {"quant_type": {"type": "Int8WeightOnlyConfig"}}),
    "int4-torchao": ("torchao", {"quant_type": {"type": "Int4WeightOnlyConfig"}}),
    "fp8-torchao": ("torchao", {"quant_type": {"type": "Float8WeightOnlyConfig"}}),
    "nf4-bnb": ("bitsandbytes", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}),
}


@dataclass(frozen=True)
class Quantization:
    """One component's quantisation: the backend and the keywords of its config class."""

    backend: str
    options: dict[str, Any] = field(default_factory=dict)
    level: str | None = None  # the precision level it came from, when it did


def component_names(family) -> dict[str, str]:
    """component name -> the precision option that sets it, for a family class or instance."""
    names = {family.denoiser_subfolder: "base_model_precision"}
    for slot, attribute in enumerate(family.text_encoder_attributes):
        names[attribute] = f"text_encoder_{slot + 1}_precision"
    return names


def read_entries(settings, family) -> dict[str, dict[str, Any]]:
    """quantization_config as {component or "default": entry}; ConfigError for bad JSON or unknown names."""
    raw = settings.quantization_config
    if raw in (None, "", {}):
        return {}
    parsed = raw if isinstance(raw, dict) else _parse_text(str(raw).strip())
    if not isinstance(parsed, dict):
        raise ConfigError(OPTION, f"{OPTION} must be a JSON object keyed by component, not "
                                  f"{type(parsed).__name__}; e.g. {{\"transformer\": {{\"weights_dtype\": \"int8\"}}}}.")
    known = [*component_names(family), DEFAULT_ENTRY]
    for name, entry in parsed.items():
        if name not in known:
            raise ConfigError(OPTION, f"{OPTION} names component {name!r}, which model_family={family.name} does "
                                      f"not load; use one of: {', '.join(known)}.")
        if not isinstance(entry, dict):
            raise ConfigError(OPTION, f"{OPTION}[{name!r}] must be an object of quantisation keywords, not "
                                      f"{type(entry).__name__}.")
    return parsed


def _parse_text(text: str) -> Any:
    source = OPTION
    if not text.startswith("{") and os.path.isfile(text):
        source = f"{OPTION} file {text}"
        with open(text, encoding="utf-8") as handle:
            text = handle.read()
    elif not text.startswith("{"):
        raise ConfigError(OPTION, f"{OPTION}={text!r} is neither inline JSON nor an existing file; give a JSON "
                                  "object or the path of a file holding one.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(OPTION, f"{source} is not valid JSON ({error}); write an object keyed by component, "
                                  "such as {\"transformer\": {\"weights_dtype\": \"int8\"}}.") from None


def plan(settings, family) -> dict[str, Quantization]:
    """component -> its quantisation, for the components that get one. Raises ConfigError."""
    if settings.quantize_via != "pipeline" and settings.quantization_config not in (None, "", {}):
        raise ConfigError(OPTION, f"{OPTION} is only read with quantize_via=pipeline (quantising while loading); "
                                  f"set quantize_via=pipeline, or remove {OPTION}.")
    entries = read_entries(settings, family)
    result = {}
    for component, option in component_names(family).items():
        level = getattr(settings, option) or NO_CHANGE
        entry = entries.get(component, entries.get(DEFAULT_ENTRY))
        quantization = _merge(component, level, entry)
        if quantization is not None:
            result[component] = quantization
    return result


def _merge(component: str, level: str, entry: dict[str, Any] | None) -> Quantization | None:
    preset = LEVEL_PRESETS.get(level)
    if entry is None:
        return None if preset is None else Quantization(preset[0], _copy(preset[1]), level)
    backend = _entry_backend(component, entry)
    options = {key: value for key, value in entry.items() if key != "quant_method"}
    if preset is not None and backend in (None, preset[0]):
        merged = _copy(preset[1])
        quant_type = options.pop("quant_type", None)
        merged.update(options)
        if isinstance(quant_type, dict):
            merged["quant_type"] = {**merged.get("quant_type", {}), **quant_type}
        elif quant_type is not None:
            merged["quant_type"] = quant_type
        return Quantization(preset[0], merged, level)
    if backend is None:
        raise ConfigError(OPTION, f"{OPTION}[{component!r}] does not say which backend quantises it; add "
                                  f"\"quant_method\": one of {', '.join(BACKENDS)}.")
    return Quantization(backend, options)


def _entry_backend(component: str, entry: dict[str, Any]) -> str | None:
    named = entry.get("quant_method")
    if named is not None:
        if named not in BACKENDS:
            raise ConfigError(OPTION, f"{OPTION}[{component!r}] has quant_method={named!r}; the loader quantises "
                                      f"with {', '.join(BACKENDS)} (.gguf files are read by their own loader).")
        return named
    found = {backend for backend, keys in _BACKEND_KEYS.items()
             for key in entry if any(key == k or (k.endswith("_") and key.startswith(k)) for k in keys)}
    if len(found) > 1:
        raise ConfigError(OPTION, f"{OPTION}[{component!r}] mixes keywords of {' and '.join(sorted(found))}; "
                                  "keep one backend's keywords and name it with quant_method.")
    return found.pop() if found else None


def _copy(options: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(options))


def torchao_config_name(quantization: Quantization) -> str:
    """The torchao.quantization class a torchao quantisation builds."""
    quant_type = quantization.options.get("quant_type")
    if isinstance(quant_type, str):
        return quant_type
    if isinstance(quant_type, dict) and isinstance(quant_type.get("type"), str):
        return quant_type["type"]
    raise ConfigError(OPTION, "a torchao entry needs quant_type: a torchao.quantization config class name such as "
                              "\"Int8WeightOnlyConfig\", or an object with \"type\" naming one.")
