"""LyCORIS adapters (LoKr, LoHa, LoCon, full, ...) as a TrainableModel.

The network is described by the JSON file named by ``lycoris_config``: the
keyword arguments of ``lycoris.create_lycoris`` (algo, multiplier,
linear_dim/alpha, conv_dim/alpha, factor, ...) plus an optional
``apply_preset`` (target_module, target_name, module_algo_map,
name_algo_map, ...) that chooses which layers are wrapped.

The network hooks the forward of the denoiser's layers and is registered as
a submodule of the denoiser, so the denoiser stays the module accelerate
prepares (DDP sees the adapter's parameters, gradient checkpointing applies)
and the family predicts through it unchanged. The finished adapter is
written as ``pytorch_lora_weights.safetensors`` in LyCORIS key layout, which
``lycoris.create_lycoris_from_weights`` loads onto a fresh denoiser.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from typing import Any, Iterator

import torch

from simpletuner.atomic_files import save_safetensors
from simpletuner.config.errors import ConfigError
from simpletuner.training.trainable import TrainableModel

logger = logging.getLogger(__name__)

LYCORIS_FILE = "pytorch_lora_weights.safetensors"
NETWORK_ATTRIBUTE = "lycoris_network"  # the network's name as a submodule of the denoiser
METADATA_CONFIG_KEY = "lycoris_config"

# Top-level keys lycoris.create_lycoris reads (it silently ignores any other, so typos are caught here).
KNOWN_KEYS = frozenset({
    "algo", "multiplier", "linear_dim", "linear_alpha", "conv_dim", "conv_alpha", "factor", "dropout",
    "rank_dropout", "module_dropout", "use_tucker", "use_cp", "use_conv_cp", "disable_conv_cp", "use_scalar",
    "block_size", "train_norm", "constraint", "constrain", "rescaled", "dora_wd", "wd_on_output", "full_matrix",
    "bypass_mode", "unbalanced_factorization", "train_llm_adapter", "decompose_both", "preset", "apply_preset",
    "warn_on_unmatched",
})
NUMERIC_KEYS = ("multiplier", "linear_dim", "linear_alpha", "conv_dim", "conv_alpha", "factor", "dropout",
                "rank_dropout", "module_dropout", "constraint", "block_size")
_PRESET_LIST_KEYS = ("target_module", "target_name", "exclude_name")
_PRESET_MAP_KEYS = ("module_algo_map", "name_algo_map")
_CLASS_NAMES_SHOWN = 40
ATTENTION_CLASS = "Attention"


# --- the configuration file --------------------------------------------------------------

def load_lycoris_config(path: str | None) -> dict[str, Any]:
    """Read and check the lycoris_config JSON file (a relative path is taken from the working directory)."""
    if not path:
        raise ConfigError("lycoris_config", "lora_type=lycoris needs lycoris_config: the path of a JSON file "
                                            'describing the network, e.g. {"algo": "lokr", "factor": 16}.')
    resolved = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(resolved):
        raise ConfigError("lycoris_config", f"lycoris_config={path!r}: no such file ({resolved}). Create it (see "
                                            "documentation for the format) or point lycoris_config at your "
                                            "LyCORIS JSON file.")
    try:
        with open(resolved, encoding="utf-8") as handle:
            config = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError("lycoris_config", f"lycoris_config file {resolved} is not valid JSON ({error}). "
                                            "Fix the file; it must hold one JSON object.") from error
    check_lycoris_config(config, resolved)
    return config


def check_lycoris_config(config: Any, where: str) -> None:
    """Raise ConfigError naming the file and key for anything create_lycoris would reject or ignore."""
    from lycoris.wrapper import network_module_dict

    if not isinstance(config, dict):
        raise ConfigError("lycoris_config", f"lycoris_config file {where} must hold a JSON object such as "
                                            f'{{"algo": "lokr", "factor": 16}}, not {type(config).__name__}.')
    unknown = sorted(set(config) - KNOWN_KEYS)
    if unknown:
        raise ConfigError("lycoris_config", f"lycoris_config file {where}: unknown key(s) {unknown}; LyCORIS "
                                            f"would ignore them. Known keys: {', '.join(sorted(KNOWN_KEYS))}.")
    _check_algo(config.get("algo", "lora"), where, "algo", network_module_dict)
    for key in NUMERIC_KEYS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError("lycoris_config", f"lycoris_config file {where}: {key}={value!r} must be a number.")
    preset = config.get("apply_preset")
    if preset is not None:
        _check_preset(preset, where, network_module_dict)


def _check_algo(algo: Any, where: str, key: str, algorithms) -> None:
    if not isinstance(algo, str) or algo.lower() not in algorithms:
        raise ConfigError("lycoris_config", f"lycoris_config file {where}: {key}={algo!r} is not a LyCORIS "
                                            f"algorithm; choose one of {', '.join(sorted(algorithms))}.")


def _check_preset(preset: Any, where: str, algorithms) -> None:
    from lycoris.config_sdk import VALID_PRESET_KEYS

    if not isinstance(preset, dict):
        raise ConfigError("lycoris_config", f"lycoris_config file {where}: apply_preset must be a JSON object.")
    unknown = sorted(set(preset) - set(VALID_PRESET_KEYS))
    if unknown:
        raise ConfigError("lycoris_config", f"lycoris_config file {where}: apply_preset has unknown key(s) "
                                            f"{unknown}; valid keys are {', '.join(VALID_PRESET_KEYS)}.")
    for key in _PRESET_LIST_KEYS:
        names = preset.get(key)
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ConfigError("lycoris_config", f"lycoris_config file {where}: apply_preset.{key} must be a list "
                                                f'of names, e.g. ["Attention", "FeedForward"].')
    for key in _PRESET_MAP_KEYS:
        mapping = preset.get(key) or {}
        if not isinstance(mapping, dict) or not all(isinstance(v, dict) for v in mapping.values()):
            raise ConfigError("lycoris_config", f"lycoris_config file {where}: apply_preset.{key} must map names "
                                                f'to settings objects, e.g. {{"Attention": {{"factor": 8}}}}.')
        for name, settings in mapping.items():
            if "algo" in settings:
                _check_algo(settings["algo"], where, f"apply_preset.{key}.{name}.algo", algorithms)


# --- building the network ----------------------------------------------------------------

def _preset_attributes() -> dict[str, Any]:
    from lycoris import LycorisNetwork as Network

    names = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP",
             "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    return {name: copy.deepcopy(getattr(Network, name)) for name in names}


_LIBRARY_PRESET = _preset_attributes()  # lycoris keeps presets on its class; each build starts from these


def build_network(denoiser: torch.nn.Module, config: dict[str, Any], where: str = "lycoris_config"):
    """A lycoris.LycorisNetwork over ``denoiser`` as ``config`` describes (not yet applied)."""
    from lycoris import LycorisNetwork as Network
    from lycoris import create_lycoris

    for name, value in _LIBRARY_PRESET.items():
        setattr(Network, name, copy.deepcopy(value))
    if config.get("apply_preset"):
        Network.apply_preset(with_attention_alias(copy.deepcopy(config["apply_preset"]), denoiser))
    arguments = {key: value for key, value in config.items() if key != "apply_preset"}
    arguments.setdefault("multiplier", 1.0)
    network = create_lycoris(denoiser, **arguments)
    if not network.loras:
        classes = sorted({type(module).__name__ for module in denoiser.modules()})
        raise ConfigError("lycoris_config", f"lycoris_config {where} matched no layer of "
                                            f"{type(denoiser).__name__}. Module classes it has include: "
                                            f"{', '.join(classes[:_CLASS_NAMES_SHOWN])}. Fix "
                                            "apply_preset.target_module / target_name.")
    return network


def with_attention_alias(preset: dict[str, Any], denoiser: torch.nn.Module) -> dict[str, Any]:
    """Let "Attention" in a preset also name the model-specific attention classes of newer diffusers models.

    Diffusers gives many transformers their own attention class (FluxAttention,
    ...) built on AttentionModuleMixin instead of the shared ``Attention``;
    configs written for "Attention" then match nothing. Each such class
    present in the denoiser is added beside "Attention", with its map entry.
    """
    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:
        return preset
    targets = preset.get("target_module") or []
    algo_map = preset.get("module_algo_map") or {}
    if ATTENTION_CLASS not in targets and ATTENTION_CLASS not in algo_map:
        return preset
    aliases = sorted({type(module).__name__ for module in denoiser.modules()
                      if isinstance(module, AttentionModuleMixin)} - {ATTENTION_CLASS})
    if ATTENTION_CLASS in targets:
        preset["target_module"] = list(targets) + [name for name in aliases if name not in targets]
    if ATTENTION_CLASS in algo_map:
        for name in aliases:
            algo_map.setdefault(name, copy.deepcopy(algo_map[ATTENTION_CLASS]))
    if aliases:
        logger.info("lycoris_config: 'Attention' also covers %s", ", ".join(aliases))
    return preset


def perturb_lokr_factors(network, scale: float, generator: torch.Generator) -> int:
    """Give each LoKr layer's zero-initialised factor small normal values (std ``scale``).

    LoKr starts as a no-op because its second factor is zero, which also
    leaves the first factor without a gradient until the second has moved.
    A tiny perturbation lets both learn from the first step. Returns the
    number of factors changed.
    """
    from lycoris.modules.lokr import LokrModule

    changed = 0
    with torch.no_grad():
        for layer in network.loras:
            if not isinstance(layer, LokrModule):
                continue
            for name in ("lokr_w2", "lokr_w2_b"):
                factor = getattr(layer, name, None)
                if isinstance(factor, torch.nn.Parameter) and not factor.any():
                    noise = torch.randn(factor.shape, generator=generator, dtype=torch.float32) * scale
                    factor.copy_(noise.to(factor.dtype))
                    changed += 1
    return changed


def save_lycoris_weights(network, path: str, config: dict[str, Any] | None = None) -> None:
    """Write the network's tensors in LyCORIS layout to ``path`` (atomically)."""
    metadata = {"format": "pt"}
    if config is not None:
        metadata[METADATA_CONFIG_KEY] = json.dumps(config, sort_keys=True)
    save_safetensors(network.state_dict(), path, metadata)


def load_weights_into(network, path: str, key: str = "init_lora") -> None:
    """Copy a LyCORIS file's tensors into ``network``; every trained tensor must be present and fit."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ConfigError(key, f"{key}={path!r}: no such file. Point {key} at a LyCORIS .safetensors file.")
    weights = load_file(path)
    load_network_state(network, weights, f"{key} file {path}", key)


def load_network_state(network, state: dict[str, torch.Tensor], source: str, key: str) -> None:
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(name for name in set(expected) & set(state) if expected[name].shape != state[name].shape)
    if missing or unexpected or mismatched:
        raise ConfigError(key, f"{source} does not fit this LyCORIS network: {len(missing)} tensors missing "
                               f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                               f"{len(mismatched)} of another shape (e.g. {mismatched[:3]}). It must come from "
                               "the same lycoris_config and base model.")
    network.load_state_dict(state, strict=False)  # non-persistent buffers (scalar) are never saved


# --- the TrainableModel ------------------------------------------------------------------

class LycorisNetwork(TrainableModel):
    """``lora_type=lycoris``: a LyCORIS network on the family's denoiser."""

    checkpoint_key = "lycoris"

    def __init__(self, family, settings):
        super().__init__(family, settings)
        self.network = None
        self.config: dict[str, Any] = {}

    def attach(self) -> None:
        settings = self.settings
        if settings.lora_format not in (None, "diffusers"):
            raise ConfigError("lora_format", f"lora_format={settings.lora_format} applies to PEFT LoRA "
                                             "(lora_type=standard); LyCORIS adapters are always written in "
                                             "LyCORIS layout. Remove lora_format or use lora_type=standard.")
        self.config = load_lycoris_config(settings.lycoris_config)
        self.module.requires_grad_(False)
        network = build_network(self.module, self.config, str(settings.lycoris_config))
        if settings.init_lokr_norm is not None:
            self._perturb(network, float(settings.init_lokr_norm))
        network.apply_to()
        if settings.init_lora:
            load_weights_into(network, settings.init_lora)
        device = next(self.module.parameters()).device
        network.to(device)
        network.requires_grad_(True)
        self.module.add_module(NETWORK_ATTRIBUTE, network)
        self.network = network
        self._collect_parameters()
        logger.info("LyCORIS %s: %d layers, %d trainable parameters", self.config.get("algo", "lora"),
                    len(network.loras), sum(p.numel() for p in self.parameters))

    def _perturb(self, network, scale: float) -> None:
        from lycoris.modules.lokr import LokrModule

        algo = self.config.get("algo", "lora")
        if not any(isinstance(layer, LokrModule) for layer in network.loras):
            raise ConfigError("init_lokr_norm", f"init_lokr_norm applies to LoKr layers, but lycoris_config "
                                                f"{self.settings.lycoris_config} builds algo={algo}. Remove "
                                                "init_lokr_norm or set algo to lokr.")
        generator = torch.Generator().manual_seed(int(self.settings.seed or 0))
        if not perturb_lokr_factors(network, scale, generator):
            logger.warning("init_lokr_norm=%s changed nothing: no LoKr factor starts at zero "
                           "(use_scalar already starts them non-zero).", scale)

    def _network(self, module: torch.nn.Module):
        network = getattr(module, NETWORK_ATTRIBUTE, None)
        if network is None:
            raise ValueError(f"{type(module).__name__} carries no LyCORIS network; call attach() first.")
        return network

    def state_dict(self, module):
        return dict(self._network(module).state_dict())

    def load_state_dict(self, module, state):
        load_network_state(self._network(module), state, "the checkpoint's LyCORIS weights", "resume_from_checkpoint")

    def save(self, module, folder):
        os.makedirs(folder, exist_ok=True)
        save_lycoris_weights(self._network(module), os.path.join(folder, LYCORIS_FILE), self.config)

    @contextlib.contextmanager
    def strength(self, multiplier: float) -> Iterator[None]:
        """Scale the adapter's effect (e.g. validation_lycoris_strength) inside the block."""
        network = self.network
        previous = network.multiplier
        network.set_multiplier(float(multiplier))
        try:
            yield
        finally:
            network.set_multiplier(previous)
