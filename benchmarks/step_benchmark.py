"""Trainer overhead per step: the trainer's seconds/step next to a bare PyTorch + PEFT loop.

Both train the same tiny SDXL UNet with the same LoRA, optimizer class, batch size and latent
size; the bare loop uses random latents/embeds already in memory, the trainer reads its warm
caches. Also reports start-up: process start to the end of the first training step.

    python benchmarks/step_benchmark.py [--steps 60] [--batch 2] [--resolution 256]
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

from tiny_sdxl_run import write_project  # noqa: E402  (benchmarks/, beside this script)


def steady_state(timestamps: list[float], skip: int) -> float:
    gaps = [b - a for a, b in zip(timestamps[skip:], timestamps[skip + 1:])]
    return statistics.median(gaps)


def trainer_run(root: str, steps: int, batch: int, resolution: int) -> tuple[list[float], float]:
    from simpletuner.training.callbacks import Callback
    from tiny_sdxl_run import lora_settings, train_with

    # like the bare loop: no clipping, no LoRA dropout
    settings = lora_settings(root, "trainer", steps, batch, resolution, max_grad_norm=0, lora_dropout=0)
    stamps: list[float] = []

    class StepTimer(Callback):
        def on_step_end(self, trainer, step, loss):
            stamps.append(time.perf_counter())

    train_with(settings, StepTimer())
    return stamps, stamps[0] - PROCESS_START


def bare_run(model: str, steps: int, batch: int, resolution: int) -> list[float]:
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    from simpletuner.config.settings import Settings
    from simpletuner.training.optimizers import build_optimizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = build_optimizer(Settings({"optimizer": "adamw_bf16", "learning_rate": 1e-4}), [{"params": params}])
    size = resolution // 8
    latents = torch.randn(batch, 4, size, size)
    embeds = torch.randn(batch, 77, unet.config.cross_attention_dim)
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(batch, pooled_dim),
             "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=torch.float32)}
    stamps = []
    for _ in range(steps):
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (batch,))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, embeds, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return stamps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256, help="pixels; latents are resolution/8")
    parser.add_argument("--startup-only", metavar="ROOT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.startup_only:  # child process: time from its own start to the end of the first step
        _, startup = trainer_run(args.startup_only, 1, args.batch, args.resolution)
        print(f"{startup:.3f}")
        return
    with tempfile.TemporaryDirectory() as root:
        model = write_project(root, args.resolution)
        trainer_run(root, 2, args.batch, args.resolution)  # builds the caches
        startup = float(subprocess.run([sys.executable, __file__, "--startup-only", root, "--batch", str(args.batch),
                                        "--resolution", str(args.resolution)], check=True, capture_output=True,
                                       text=True).stdout.strip().splitlines()[-1])
        stamps, _ = trainer_run(root, args.steps, args.batch, args.resolution)
        bare = bare_run(model, args.steps, args.batch, args.resolution)
    skip = max(5, args.steps // 6)
    trainer_step, bare_step = steady_state(stamps, skip), steady_state(bare, skip)
    print(f"tiny SDXL LoRA, batch {args.batch}, {args.resolution}px ({args.resolution // 8}x{args.resolution // 8} latents)")
    print(f"bare PyTorch+PEFT loop : {bare_step:.4f} s/step")
    print(f"simpletuner trainer    : {trainer_step:.4f} s/step")
    print(f"ratio trainer/bare     : {trainer_step / bare_step:.3f}")
    print(f"start-up to first step : {startup:.2f} s (fresh process: imports, model load, warm caches, first step)")


if __name__ == "__main__":
    main()
