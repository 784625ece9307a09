"""`simpletuner train` as a subprocess (the way a user starts a multi-process run), for distributed tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


class Run:
    """`simpletuner train` in a subprocess, its output going to a log file (a pipe could fill up and block it)."""

    def __init__(self, folder: Path, *args: str, **env):
        environment = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK")}
        environment.update(HF_HOME=str(folder / "hf"), SIMPLETUNER_LOG_SAMPLE_IDS="1", **env)
        self.log = folder / f"run-{time.monotonic_ns()}.log"
        with open(self.log, "w") as handle:
            self.process = subprocess.Popen([sys.executable, "-m", "simpletuner", "train", *args], cwd=folder,
                                            env=environment, stdout=handle, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 150) -> int:
        return self.process.wait(timeout=timeout)

    def succeed(self) -> str:
        assert self.wait() == 0, self.output()[-4000:]
        return self.output()


def write_config(folder: Path, config: dict) -> dict:
    """config/config.json under ``folder`` (where Run starts), so every process reads the same settings."""
    (folder / "config").mkdir(exist_ok=True)
    (folder / "config" / "config.json").write_text(json.dumps(config))
    return config


def sample_lines(output_dir: Path) -> dict[int, list[dict]]:
    lines = {}
    for rank in (0, 1):
        path = output_dir / "debug" / f"sample_ids-rank{rank}.jsonl"
        lines[rank] = [json.loads(line) for line in path.read_text().splitlines()]
    return lines
