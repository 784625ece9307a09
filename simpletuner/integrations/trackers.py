"""Which experiment trackers a run reports to, and how accelerate should start them.

``report_to`` names one tracker, ``all`` (every supported tracker whose package
is installed) or ``none``. A named tracker whose package is missing is a
configuration error, reported before any model is loaded.
"""

from __future__ import annotations

import importlib.util
import os

from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings

# tracker name -> (modules that provide it, pip package to install)
TRACKER_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "comet_ml": (("comet_ml",), "comet_ml"),
}


def tracker_installed(name: str) -> bool:
    modules, _ = TRACKER_PACKAGES[name]
    return any(importlib.util.find_spec(module) is not None for module in modules)


def requested_trackers(settings: Settings) -> list[str]:
    """Tracker names exactly as the user asked for them (``all`` expanded to every supported one)."""
    report_to = str(settings.report_to or "none").strip()
    if report_to == "none":
        return []
    if report_to == "all":
        return list(TRACKER_PACKAGES)
    return [name.strip() for name in report_to.split(",") if name.strip() and name.strip() != "none"]


def tracker_names(settings: Settings) -> list[str]:
    """Trackers this run starts: ``all`` quietly skips trackers whose package is not installed."""
    names = requested_trackers(settings)
    if str(settings.report_to).strip() == "all":
        return [name for name in names if tracker_installed(name)]
    return names


def tracker_errors(settings: Settings) -> list[ConfigError]:
    if str(settings.report_to).strip() == "all":
        return []
    errors = []
    for name in requested_trackers(settings):
        if name not in TRACKER_PACKAGES:
            errors.append(ConfigError("report_to", f"report_to: {name!r} is not a supported tracker. Use one of "
                                                   f"{', '.join(TRACKER_PACKAGES)}, all or none."))
        elif not tracker_installed(name):
            package = TRACKER_PACKAGES[name][1]
            errors.append(ConfigError("report_to", f"report_to={name} needs the {package} package, which is not "
                                                   f"installed. Install it with `pip install {package}` or choose "
                                                   f"another tracker (report_to=tensorboard or none)."))
    return errors


def tracker_config(settings: Settings) -> dict:
    """The run's explicit settings, limited to the plain scalars every tracker accepts."""
    return {key: value for key, value in settings.explicit().items() if isinstance(value, (int, float, str, bool))}


def tracker_init_kwargs(settings: Settings, names: list[str], logging_dir: str) -> dict:
    """Per-tracker keyword arguments for ``accelerator.init_trackers``.

    wandb gets the run name and, unless WANDB_DIR says otherwise, writes its
    local files under the logging folder instead of the current directory.
    TensorBoard writes to ``<logging_dir>/<tracker_project_name>``; comet_ml
    uses its own naming.
    """
    kwargs: dict[str, dict] = {}
    if "wandb" in names:
        wandb_kwargs = {"name": settings.tracker_run_name}
        if not os.environ.get("WANDB_DIR"):
            os.makedirs(logging_dir, exist_ok=True)
            wandb_kwargs["dir"] = logging_dir
        kwargs["wandb"] = wandb_kwargs
    return kwargs
