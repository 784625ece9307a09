"""Writing the finished model, and its EMA variant in output_dir/ema."""

from __future__ import annotations

import os


def save_outputs(trained, module, output_dir: str, ema=None) -> None:
    """trained: the run's TrainableModel; module: its unwrapped module."""
    trained.save(module, output_dir)
    if ema is not None:
        with ema.swapped_in(trained.parameters):
            trained.save(module, os.path.join(output_dir, "ema"))
