"""A pipeline of another class over the same loaded modules (e.g. a ControlNet or control pipeline
over the family's text-to-image one)."""

from __future__ import annotations

import inspect


def rebuilt_pipeline(pipeline, pipeline_class, **extra):
    """``pipeline_class`` over ``pipeline``'s modules and settings (``extra`` adds constructor arguments).

    Built directly rather than with ``from_pipe``, which casts every module to one
    dtype and so would change the live training modules.
    """
    accepted = set(inspect.signature(pipeline_class.__init__).parameters) - {"self"}
    parts = {name: module for name, module in pipeline.components.items() if name in accepted}
    options = {name: value for name, value in pipeline.config.items() if name in accepted and name not in parts}
    if "add_watermarker" in accepted:  # SDXL: watermark exactly when the family's own pipeline does
        options["add_watermarker"] = getattr(pipeline, "watermark", None) is not None
    return pipeline_class(**parts, **options, **extra)
