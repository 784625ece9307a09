"""Optimizer name -> configured ``torch.optim.Optimizer``.

Hyper-parameters are resolved in this order, each step overriding the last:

1. the optimizer's defaults in ``OPTIMIZER_CHOICES`` below;
2. ``adam_beta1``/``adam_beta2``, ``adam_weight_decay`` and ``adam_epsilon``,
   but only when the user set them explicitly and the optimizer takes that
   hyper-parameter (they are Adam-family options; for an optimizer without,
   say, an epsilon they are ignored with a warning);
3. ``optimizer_config`` ("key=value,key2=value2");
4. ``optimizer_beta1``/``optimizer_beta2``, which always win and are an error
   for an optimizer that has no betas.

Schedule-free variants (all AdamW, the learning rate is held constant by the
optimizer's own averaging, so pair them with a constant lr_scheduler):

- ``adamw_schedulefree``: our ``AdamWScheduleFreeKahan``; bf16/fp16 weights
  keep Kahan compensation buffers so small updates are not rounded away.
- ``adamw_schedulefree+aggressive``: the same, averaging with ``r=1`` (recent
  iterates weigh more, so the averaged weights follow training faster) and a
  lighter weight decay of 1e-3 instead of 1e-2.
- ``adamw_schedulefree+no_kahan``: the schedulefree package's own
  ``AdamWScheduleFree``; arithmetic in the weights' dtype, no extra buffers.

All three use ``lr_warmup_steps`` as their built-in warmup.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from simpletuner.config.errors import ConfigError

logger = logging.getLogger(__name__)

# Devices torchao's low-bit optimizers compile for (they use torch.compile).
_TORCHAO_DEVICES = ("cpu", "cuda", "xpu")
# Below this, a prodigy learning_rate is almost certainly an Adam-style value by mistake.
_PRODIGY_LOW_LR = 0.1
# Keyword arguments that never come from optimizer_config.
_RESERVED_KEYS = ("params", "self")


def _import(module: str, attribute: str) -> Callable[[], type]:
    return lambda: getattr(importlib.import_module(module), attribute)


def _torchao_device_problem(name: str, params: list[torch.Tensor]) -> str | None:
    devices = {p.device.type for p in params}
    unsupported = sorted(devices - set(_TORCHAO_DEVICES))
    if unsupported:
        return (f"optimizer={name} runs on {', '.join(_TORCHAO_DEVICES)} devices (torchao low-bit optimizers "
                f"use torch.compile), but the weights are on {', '.join(unsupported)}; "
                "choose adamw_bf16 or optimi-adamw on this machine")
    if name in ("ao-adamfp8", "ao-adamwfp8") and "cuda" in devices:
        capability = torch.cuda.get_device_capability()
        if capability < (8, 9):
            return (f"optimizer={name} needs an NVIDIA GPU with FP8 support (compute capability 8.9 or newer, "
                    f"e.g. Ada or Hopper); this GPU is {capability[0]}.{capability[1]}. "
                    "Choose ao-adamw8bit or adamw_bf16 instead")
    return None


@dataclass(frozen=True)
class OptimizerChoice:
    """How to build one ``optimizer`` choice."""

    load: Callable[[], type]  # imports and returns the optimizer class
    package: str  # pip package that provides it
    defaults: Mapping[str, Any] = field(default_factory=dict)
    device_problem: Callable[[str, list[torch.Tensor]], str | None] | None = None
    schedule_free: bool = False
    gradient_release: bool = False  # supports optimi's per-parameter step during backward


_ADAM = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}
_OWN = "simpletuner.training.optimizer_classes"


def _optimi(attribute: str, **defaults: Any) -> OptimizerChoice:
    return OptimizerChoice(_import("optimi", attribute), "torch-optimi", defaults, gradient_release=True)


def _torchao(attribute: str, **defaults: Any) -> OptimizerChoice:
    return OptimizerChoice(_import("torchao.optim", attribute), "torchao", defaults, _torchao_device_problem)


OPTIMIZER_CHOICES: dict[str, OptimizerChoice] = {
    "adamw_bf16": OptimizerChoice(_import(_OWN, "AdamWBF16"), "torch", _ADAM),
    "ao-adamw8bit": _torchao("AdamW8bit", **_ADAM),
    "ao-adamw4bit": _torchao("AdamW4bit", **_ADAM),
    "ao-adamfp8": _torchao("AdamFp8", betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    "ao-adamwfp8": _torchao("AdamWFp8", **_ADAM),
    "adamw_schedulefree": OptimizerChoice(_import(_OWN, "AdamWScheduleFreeKahan"), "torch", _ADAM,
                                          schedule_free=True),
    "adamw_schedulefree+aggressive": OptimizerChoice(_import(_OWN, "AdamWScheduleFreeKahan"), "torch",
                                                     {**_ADAM, "weight_decay": 1e-3, "r": 1.0}, schedule_free=True),
    "adamw_schedulefree+no_kahan": OptimizerChoice(_import("schedulefree", "AdamWScheduleFree"), "schedulefree",
                                                   _ADAM, schedule_free=True),
    "optimi-stableadamw": _optimi("StableAdamW", betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-6),
    "optimi-adamw": _optimi("AdamW", betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-6),
    "optimi-lion": _optimi("Lion", betas=(0.9, 0.99), weight_decay=0.0),
    "optimi-radam": _optimi("RAdam", betas=(0.9, 0.99), weight_decay=0.0, eps=1e-6),
    "optimi-ranger": _optimi("Ranger", betas=(0.9, 0.99), weight_decay=0.0, eps=1e-6),
    "optimi-adan": _optimi("Adan", betas=(0.98, 0.92, 0.99), weight_decay=2e-2, eps=1e-6),
    "optimi-adam": _optimi("Adam", betas=(0.9, 0.99), weight_decay=0.0, eps=1e-6),
    "optimi-sgd": _optimi("SGD", momentum=0.9, weight_decay=0.0),
    "soap": OptimizerChoice(_import("pytorch_optimizer.optimizer.soap", "SOAP"), "pytorch-optimizer",
                            {"betas": (0.95, 0.95), "weight_decay": 1e-2, "eps": 1e-8}),
    "prodigy": OptimizerChoice(_import("simpletuner.training.prodigy_stop", "ProdigyWithStop"), "prodigyopt",
                               {**_ADAM, "d_coef": 1.0, "safeguard_warmup": False, "use_bias_correction": False,
                                "slice_p": 11}),
}


def parse_optimizer_config(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``"d_coef=0.1,betas=(0.9,0.99),decouple=true"`` -> ``{"d_coef": 0.1, "betas": (0.9, 0.99), "decouple": True}``.

    Values become bools (true/false), None (none/null), ints, floats, tuples
    (written in parentheses or brackets) or else strings. A mapping (from a
    JSON config file) is taken as already parsed.
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    parsed: dict[str, Any] = {}
    for item in _split_top_level(text):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("optimizer_config", f"optimizer_config item {item.strip()!r} is not key=value; write "
                                                  "it like optimizer_config=d_coef=0.1,betas=(0.9,0.99)")
        parsed[key] = _parse_value(value.strip())
    return parsed


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside parentheses or brackets."""
    items, depth, current = [], 0, []
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise ConfigError("optimizer_config", f"optimizer_config {text!r} has unbalanced brackets")
    items.append("".join(current))
    return [item for item in items if item.strip()]


def _parse_value(value: str) -> Any:
    if len(value) >= 2 and value[0] in "([" and value[-1] in ")]":
        return tuple(_parse_value(part.strip()) for part in _split_top_level(value[1:-1]))
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for number in (int, float):
        try:
            return number(value)
        except ValueError:
            pass
    return value.strip("'\"")


def build_optimizer(settings, param_groups: list[dict]) -> torch.optim.Optimizer:
    """The ``settings.optimizer`` optimizer over ``param_groups``.

    Groups without an ``lr`` use ``learning_rate``. Raises ``ConfigError`` for
    an unknown optimizer, a missing package, a device the optimizer cannot run
    on, or a bad ``optimizer_config``.
    """
    name = settings.optimizer
    choice = _choice(name)
    optimizer_class = _load_class(name, choice)
    groups = [{**group, "params": list(group["params"])} for group in param_groups]
    params = [p for group in groups for p in group["params"]]
    problem = choice.device_problem(name, params) if choice.device_problem else None
    if problem:
        raise ConfigError("optimizer", problem)
    kwargs = resolve_hyperparameters(settings, name, choice, optimizer_class)
    if "bf16_stochastic_round" in accepted_keys(optimizer_class) and any(p.dtype == torch.bfloat16 for p in params):
        kwargs.setdefault("bf16_stochastic_round", True)  # torchao: keep small updates to bf16 weights
    if name == "prodigy":
        _require_one_learning_rate(groups, settings.learning_rate)
    optimizer = optimizer_class(groups, **kwargs)
    optimizer_train_mode(optimizer)
    return optimizer


def _require_one_learning_rate(groups: list[dict], default: float) -> None:
    rates = {group.get("lr", default) for group in groups} - {0.0}
    if len(rates) > 1:
        raise ConfigError("optimizer", f"optimizer=prodigy needs one learning rate for all trained weights, got "
                                       f"{sorted(rates)} (e.g. text_encoder_lr differs from learning_rate). "
                                       "Unset text_encoder_lr or choose another optimizer.")


def _choice(name: str | None) -> OptimizerChoice:
    if name not in OPTIMIZER_CHOICES:
        raise ConfigError("optimizer", f"optimizer={name!r} is not one of the supported optimizers: "
                                       f"{', '.join(OPTIMIZER_CHOICES)}. Set optimizer to one of them.")
    return OPTIMIZER_CHOICES[name]


def _load_class(name: str, choice: OptimizerChoice) -> type:
    try:
        return choice.load()
    except ModuleNotFoundError as error:
        raise ConfigError("optimizer", f"optimizer={name} needs the {choice.package} package (importing "
                                       f"{error.name!r} failed). Install it with: pip install {choice.package}") \
            from error


def accepted_keys(optimizer_class: type) -> list[str]:
    """Named keyword arguments the optimizer's constructor takes (what optimizer_config may set)."""
    signature = inspect.signature(optimizer_class.__init__)
    return [
        name for name, parameter in signature.parameters.items()
        if name not in _RESERVED_KEYS and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    ]


def resolve_hyperparameters(settings, name: str, choice: OptimizerChoice, optimizer_class: type) -> dict[str, Any]:
    """Keyword arguments for ``optimizer_class``, following the precedence in the module docstring."""
    accepted = accepted_keys(optimizer_class)
    kwargs: dict[str, Any] = {key: value for key, value in choice.defaults.items() if key in accepted}
    kwargs["lr"] = settings.learning_rate
    kwargs.update(_explicit_adam_settings(settings, name, accepted, kwargs.get("betas")))
    user_config = parse_optimizer_config(settings.optimizer_config)
    unknown = sorted(set(user_config) - set(accepted))
    if "lr" in user_config:
        raise ConfigError("optimizer_config", "optimizer_config sets lr; set the learning_rate option instead.")
    if unknown:
        allowed = ", ".join(key for key in accepted if key != "lr")
        raise ConfigError("optimizer_config", f"optimizer_config key(s) {', '.join(unknown)} are not accepted by "
                                              f"optimizer={name}. Accepted keys: {allowed}.")
    kwargs.update(user_config)
    betas = _optimizer_betas(settings, name, kwargs.get("betas"), "betas" in accepted)
    if betas is not None:
        kwargs["betas"] = betas
    kwargs.update(_choice_specific(settings, name, choice))
    return kwargs


def _explicit_adam_settings(settings, name: str, accepted: list[str], default_betas) -> dict[str, Any]:
    pairs = {"weight_decay": "adam_weight_decay", "eps": "adam_epsilon"}
    chosen: dict[str, Any] = {}
    for key, option in pairs.items():
        if settings.is_set(option):
            if key in accepted:
                chosen[key] = getattr(settings, option)
            else:
                logger.warning("%s is ignored: optimizer=%s has no %s setting", option, name, key)
    for index, option in enumerate(("adam_beta1", "adam_beta2")):
        if settings.is_set(option):
            if default_betas is None:
                logger.warning("%s is ignored: optimizer=%s has no betas", option, name)
                continue
            betas = list(chosen.get("betas", default_betas))
            betas[index] = getattr(settings, option)
            chosen["betas"] = tuple(betas)
    return chosen


def _optimizer_betas(settings, name: str, current, takes_betas: bool):
    """``current`` betas with optimizer_beta1/optimizer_beta2 applied, or None when neither is set."""
    given = {index: getattr(settings, option) for index, option in enumerate(("optimizer_beta1", "optimizer_beta2"))
             if getattr(settings, option) is not None}
    if not given:
        return None
    if not takes_betas or current is None:
        raise ConfigError("optimizer_beta1", f"optimizer={name} has no betas, so optimizer_beta1/optimizer_beta2 "
                                             "cannot apply; unset them or choose an Adam-style optimizer.")
    betas = list(current)
    for index, value in given.items():
        betas[index] = value
    return tuple(betas)


def _choice_specific(settings, name: str, choice: OptimizerChoice) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if settings.optimizer_release_gradients:
        if not choice.gradient_release:
            raise ConfigError("optimizer_release_gradients",
                              f"optimizer_release_gradients only works with the optimi-* optimizers, not "
                              f"optimizer={name}. Turn it off or choose e.g. optimi-adamw.")
        if (settings.gradient_accumulation_steps or 1) > 1:
            raise ConfigError("optimizer_release_gradients",
                              "optimizer_release_gradients steps each weight during backward, which cannot be "
                              "combined with gradient_accumulation_steps > 1. Turn one of them off.")
        extra["gradient_release"] = True
    if choice.schedule_free:
        extra["warmup_steps"] = int(settings.lr_warmup_steps or 0)
    if name == "prodigy":
        extra["prodigy_steps"] = settings.prodigy_steps
        if settings.learning_rate < _PRODIGY_LOW_LR:
            logger.warning("optimizer=prodigy multiplies learning_rate=%g by the step size it learns; it expects "
                           "a learning_rate near 1.0", settings.learning_rate)
    elif settings.prodigy_steps:
        logger.warning("prodigy_steps is ignored: optimizer=%s is not prodigy", name)
    return extra


def is_schedule_free(name: str) -> bool:
    """True for optimizers that hold the learning rate themselves (pair them with a constant lr_scheduler)."""
    return _choice(name).schedule_free


def _inner(optimizer):
    # accelerate wraps optimizers; schedule-free state lives on the wrapped one.
    return getattr(optimizer, "optimizer", optimizer)


def _has_train_mode(optimizer) -> bool:
    groups = _inner(optimizer).param_groups
    return bool(groups) and "train_mode" in groups[0]


def optimizer_train_mode(optimizer) -> None:
    """Put a schedule-free optimizer's weights at the training point; no-op for other optimizers."""
    if _has_train_mode(optimizer):
        _inner(optimizer).train()


def optimizer_eval_mode(optimizer) -> None:
    """Put a schedule-free optimizer's weights at the averaged point, for validation and saving; no-op otherwise."""
    if _has_train_mode(optimizer):
        _inner(optimizer).eval()


def prepare_gradient_release(module: torch.nn.Module, optimizer) -> None:
    """Register optimi's hooks that step and free each gradient during backward.

    Call once after ``build_optimizer`` when ``optimizer_release_gradients`` is on.
    The trainer's own ``optimizer.step()`` then finds no gradients and does
    nothing; gradient clipping cannot apply because gradients never coexist.
    """
    from optimi import prepare_for_gradient_release

    prepare_for_gradient_release(module, _inner(optimizer))
