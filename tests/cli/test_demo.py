"""The README's first command: `python -m simpletuner.demo` (what `make demo` runs), shortened to a few steps."""

from __future__ import annotations

import os
import subprocess
import sys

from safetensors.torch import load_file


def test_demo_builds_everything_and_trains(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("ENV", "CONFIG_BACKEND", "CONFIG_PATH")}
    result = subprocess.run([sys.executable, "-m", "simpletuner.demo", "--max_train_steps=4",
                             "--checkpoint_step_interval=2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = load_file(str(tmp_path / ".demo" / "output" / "pytorch_lora_weights.safetensors"))
    assert any("lora" in key for key in weights)
    assert (tmp_path / ".demo" / "output" / "checkpoint-2" / "manifest.json").exists()
