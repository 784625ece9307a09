"""Peak memory and seconds/step of the memory-saving options on a tiny SDXL LoRA run.

Each configuration trains in its own fresh process, because peak RSS is a per-process high-water
mark. The parent builds the tiny model and sample images once and warms the latent and text
caches in a first child, so no measured run pays for caching.

Reported per configuration:
- peak RSS: the whole process (imports, model load, quantisation, training), from getrusage;
- growth in training: the RSS high-water mark from the first training step on, less the RSS when
  training started (Linux: the mark is reset through /proc/self/clear_refs at that point); the
  activations and optimizer state the options target, without the ~400 MiB of loaded libraries;
- CUDA max allocated, when the run is on a GPU;
- s/step: median gap between step ends, after the first steps are dropped as warm-up.

    python benchmarks/memory_benchmark.py [--steps 20] [--batch 2] [--resolution 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from tiny_sdxl_run import write_project  # benchmarks/, beside this script

CONFIGURATIONS: dict[str, dict[str, object]] = {
    "baseline": {},
    "int8-quanto": {"base_model_precision": "int8-quanto"},
    "gradient-checkpointing": {"gradient_checkpointing": "true"},
    "group-offload-block-level": {"enable_group_offload": "true", "group_offload_type": "block_level"},
    "all-three": {"base_model_precision": "int8-quanto", "gradient_checkpointing": "true",
                  "enable_group_offload": "true", "group_offload_type": "block_level"},
}
WARMUP_STEPS = 4  # step gaps dropped before taking the median (allocator and autograd warm-up)
MIB = 1024 * 1024


# --- memory readings (this process) ---------------------------------------------------------
def process_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # ru_maxrss is KiB on Linux


def reset_rss_high_water_mark() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS; False where that is unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def proc_status_mib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: current RSS, VmHWM: its high-water mark)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024 / MIB
    raise RuntimeError(f"/proc/self/status has no {field} line")


# --- the run (child process) ------------------------------------------------------------------
def run_configuration(root: str, name: str, steps: int, batch: int, resolution: int) -> dict:
    import torch

    from simpletuner.training.callbacks import Callback
    from tiny_sdxl_run import lora_settings, train_with

    settings = lora_settings(root, name, steps, batch, resolution, **CONFIGURATIONS[name])
    on_cuda = torch.cuda.is_available()
    stamps: list[float] = []
    marks: dict[str, object] = {}

    class MemoryAndStepTimer(Callback):
        def on_train_start(self, trainer):
            marks["setup_peak_mib"] = process_peak_rss_mib()
            marks["hwm_reset"] = reset_rss_high_water_mark()
            marks["start_rss_mib"] = proc_status_mib("VmRSS") if marks["hwm_reset"] else None
            if on_cuda:
                torch.cuda.reset_peak_memory_stats()
            stamps.append(time.perf_counter())

        def on_step_end(self, trainer, step, loss):
            stamps.append(time.perf_counter())

    trainer = train_with(settings, MemoryAndStepTimer(), announce_start=True)
    growth = proc_status_mib("VmHWM") - marks["start_rss_mib"] if marks["hwm_reset"] else None
    gaps = [later - earlier for earlier, later in zip(stamps, stamps[1:])]
    return {"name": name, "device": str(trainer.device), "steps": len(gaps),
            "peak_rss_mib": max(process_peak_rss_mib(), marks["setup_peak_mib"]),
            "training_growth_mib": growth,
            "cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / MIB if on_cuda else None,
            "seconds_per_step": statistics.median(gaps[WARMUP_STEPS:] or gaps)}


# --- the parent -----------------------------------------------------------------------------
def run_child(args: argparse.Namespace, root: str, *extra: str) -> str:
    command = [sys.executable, os.path.abspath(__file__), "--root", root, "--steps", str(args.steps),
               "--batch", str(args.batch), "--resolution", str(args.resolution), *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"benchmark child {' '.join(extra)} failed with exit status {done.returncode}")
    return done.stdout.strip().splitlines()[-1]


def format_table(results: list[dict]) -> str:
    base = results[0]
    with_growth = all(result["training_growth_mib"] is not None for result in results)
    with_cuda = any(result["cuda_max_allocated_mib"] is not None for result in results)
    header = ["configuration", "peak RSS (MiB)"]
    header += ["RSS growth in training (MiB)"] if with_growth else []
    header += ["CUDA max allocated (MiB)"] if with_cuda else []
    memory_key = "cuda_max_allocated_mib" if with_cuda else "peak_rss_mib"  # the memory the options target
    header += ["s/step", f"ratio vs baseline ({'CUDA max allocated' if with_cuda else 'peak RSS'} / s/step)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        row = [result["name"], f"{result['peak_rss_mib']:.0f}"]
        row += [f"{result['training_growth_mib']:.0f}"] if with_growth else []
        row += [f"{result['cuda_max_allocated_mib']:.0f}"] if with_cuda else []
        memory_ratio = result[memory_key] / base[memory_key]
        time_ratio = result["seconds_per_step"] / base["seconds_per_step"]
        row += [f"{result['seconds_per_step']:.3f}", f"{memory_ratio:.2f}x / {time_ratio:.2f}x"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def header_lines(args: argparse.Namespace, device: str, load: float) -> list[str]:
    lines = [f"tiny SDXL LoRA (rank 8) on {device}, batch {args.batch}, {args.resolution}px, {args.steps} steps per "
             f"run, s/step = median step time after {WARMUP_STEPS} warm-up steps; one fresh process per configuration"]
    if device == "cpu":
        lines.append("on CPU, group offload moves weights CPU->CPU: it can only cost time here, not save memory")
    if load > 2:
        lines.append(f"NOTE: load average up to {load:.2f} on {os.cpu_count()} cores: other jobs were running, so "
                     "timings are noisy")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256, help="pixels; latents are resolution/8")
    parser.add_argument("--one", choices=sorted(CONFIGURATIONS), help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:  # child: model, images and warm caches
        write_project(args.root, args.resolution)
        run_configuration(args.root, "baseline", 1, args.batch, args.resolution)
        print("prepared")
        return
    if args.one:  # child: one measured configuration, one JSON line
        print(json.dumps(run_configuration(args.root, args.one, args.steps, args.batch, args.resolution)))
        return
    load = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as root:
        run_child(args, root, "--prepare")
        for name in CONFIGURATIONS:
            results.append(json.loads(run_child(args, root, "--one", name)))
            print(f"  done: {name}", flush=True)
    load = max(load, os.getloadavg()[0])  # sampled before and after the runs
    print("\n".join(header_lines(args, results[0]["device"], load)))
    print(format_table(results))


if __name__ == "__main__":
    main()
