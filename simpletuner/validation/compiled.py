"""validation_torch_compile: the validation pipelines run a torch.compile'd view of the live denoiser.

``torch.compile(denoiser)`` wraps the module without changing it, so training
keeps calling the plain module while the pipelines call the compiled
wrapper; the weights are shared, so every round renders the current ones.
The wrapper is made once and reused, so the compile cost is paid on the first
round only (later rounds recompile only when the model's structure changes,
e.g. while validation adapters are attached). A denoiser the trainer already
compiled (dynamo_backend) is used as it is.
"""

from __future__ import annotations

import logging

import torch

from simpletuner.training.compilation import compile_spec

logger = logging.getLogger("simpletuner.validation")


class ValidationCompiler:
    def __init__(self, settings):
        self.enabled = bool(settings.validation_torch_compile)
        self.training_compiled = compile_spec(settings) is not None
        self._source: torch.nn.Module | None = None
        self._compiled: torch.nn.Module | None = None
        if self.enabled and self.training_compiled:
            logger.info("validation_torch_compile: the denoiser is already compiled for training (dynamo_backend); "
                        "validation renders use that compiled module.")

    def denoiser_for(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        """What the validation pipelines should call for ``denoiser``."""
        if not self.enabled or self.training_compiled:
            return denoiser
        if self._source is not denoiser:
            logger.info("validation_torch_compile: compiling %s for validation renders (the first round is slow)",
                        type(denoiser).__name__)
            self._compiled = torch.compile(denoiser)
            self._source = denoiser
        return self._compiled
