"""torch.compile for the denoiser: dynamo_backend, dynamo_mode, dynamo_fullgraph, dynamo_dynamic and
dynamo_use_regional_compilation (TRAINING_DYNAMO_BACKEND sets the backend too).

Modules are compiled in place (``nn.Module.compile``): the module objects, their
state_dict keys and the adapters inside them stay as they are, so saving,
checkpoints and DDP wrapping are unaffected. Regional compilation compiles each
block of every list of same-class blocks (transformer blocks, resnets, ...)
separately; identical blocks then reuse one compiled graph, which shortens the
cold start on deep models.

An ``accelerate launch`` configured with a dynamo backend (its
ACCELERATE_DYNAMO_* variables) takes priority over the settings. accelerate's
own compile step in ``prepare`` is switched off so nothing is compiled twice.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping

import torch

from simpletuner.config.errors import ConfigError

logger = logging.getLogger("simpletuner.compile")


@dataclass(frozen=True)
class CompileSpec:
    backend: str
    mode: str | None = None
    fullgraph: bool = False
    dynamic: bool | None = None
    regional: bool = False

    def kwargs(self) -> dict:
        return {"backend": self.backend, "mode": None if self.mode in (None, "default") else self.mode,
                "fullgraph": self.fullgraph, "dynamic": self.dynamic}


def dynamo_backend_name(settings) -> str:
    """The validated dynamo_backend, lower case ("no" when compilation is off)."""
    from accelerate.utils import DynamoBackend

    backend = str(settings.dynamo_backend or "no").strip()
    try:
        DynamoBackend(backend.upper())
    except ValueError:
        choices = ", ".join(b.value.lower() for b in DynamoBackend)
        raise ConfigError("dynamo_backend", f"dynamo_backend={backend!r} (or TRAINING_DYNAMO_BACKEND) is not a "
                                            f"torch.compile backend accelerate knows. Use one of: {choices}.") from None
    return backend.lower()


def _flag(environ: Mapping[str, str], name: str) -> bool | None:
    raw = environ.get(name)
    return None if raw is None else raw.strip().lower() in ("1", "true", "yes")


def compile_spec(settings, environ: Mapping[str, str] = os.environ) -> CompileSpec | None:
    """What to compile with, or None for no compilation."""
    launched = environ.get("ACCELERATE_DYNAMO_BACKEND", "NO").strip()
    if launched.upper() != "NO":
        return CompileSpec(launched.lower(), environ.get("ACCELERATE_DYNAMO_MODE") or None,
                           bool(_flag(environ, "ACCELERATE_DYNAMO_USE_FULLGRAPH")),
                           _flag(environ, "ACCELERATE_DYNAMO_USE_DYNAMIC"),
                           bool(_flag(environ, "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION")))
    backend = dynamo_backend_name(settings)
    if backend == "no":
        return None
    dynamic = bool(settings.dynamo_dynamic) if settings.is_set("dynamo_dynamic") else None
    return CompileSpec(backend, settings.dynamo_mode, bool(settings.dynamo_fullgraph), dynamic,
                       bool(settings.dynamo_use_regional_compilation))


def compile_repeated_blocks(module: torch.nn.Module, kwargs: dict) -> int:
    """Compile, in place, every block of each ModuleList whose blocks share one class; returns how many."""
    count = 0
    for child in module.children():
        if isinstance(child, torch.nn.ModuleList) and len(child) and len({type(b) for b in child}) == 1:
            for block in child:
                block.compile(**kwargs)
            count += len(child)
        else:
            count += compile_repeated_blocks(child, kwargs)
    return count


def compile_denoiser(denoiser: torch.nn.Module, settings, environ: Mapping[str, str] = os.environ) -> None:
    spec = compile_spec(settings, environ)
    if spec is None:
        return
    kwargs = spec.kwargs()
    if spec.regional:
        blocks = compile_repeated_blocks(denoiser, kwargs)
        if blocks:
            logger.info("torch.compile (%s, regional): %d blocks of %s", spec.backend, blocks,
                        type(denoiser).__name__)
            return
        logger.info("torch.compile: %s has no repeated blocks; compiling it whole", type(denoiser).__name__)
    else:
        logger.info("torch.compile (%s): %s", spec.backend, type(denoiser).__name__)
    denoiser.compile(**kwargs)


def disable_accelerate_compile(accelerator) -> None:
    """The denoiser is compiled by ``compile_denoiser``; keep ``accelerator.prepare`` from compiling again."""
    from accelerate.utils import TorchDynamoPlugin

    accelerator.state.dynamo_plugin = TorchDynamoPlugin(backend="no")
