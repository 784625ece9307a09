"""Runs every benchmark in this folder in turn (`make bench`)."""

import subprocess
import sys
from pathlib import Path

for script in ("step_benchmark.py", "caching_benchmark.py", "memory_benchmark.py"):
    print(f"== {script}", flush=True)
    subprocess.run([sys.executable, str(Path(__file__).parent / script)], check=True)
