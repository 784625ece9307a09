"""Latent caching throughput next to the VAE's bare encode rate on the same images.

The bare rate encodes pixel tensors already in memory (no decoding, no writes), in batches
of the same size; the cache rate is `LatentCache.build` end to end (read, decode, resize,
crop, encode, write). The ratio cache/bare is the figure: 1.0 means caching costs nothing
beyond the VAE itself.

    python benchmarks/caching_benchmark.py [--images 48] [--resolution 256] [--batch 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    import torch

    from simpletuner.caching.store import TensorStore
    from simpletuner.caching.vae import LatentCache
    from simpletuner.config.settings import Settings
    from simpletuner.data.dataset_config import load_dataset_config, training_datasets
    from simpletuner.data.discovery import discover_dataset
    from simpletuner.data.storage.local import LocalStorage
    from simpletuner.data.transforms import load_pixels
    from simpletuner.demo.sample_data import make_sample_images
    from simpletuner.models.registry import get_family
    from simpletuner.models.tiny import build_tiny

    with tempfile.TemporaryDirectory() as root:
        model = build_tiny("sdxl", os.path.join(root, "model"))
        images = os.path.join(root, "images")
        make_sample_images(images, count=args.images)
        dataset_file = os.path.join(root, "datasets.json")
        with open(dataset_file, "w") as handle:
            handle.write(f'[{{"id": "bench", "type": "local", "instance_data_dir": "{images}", '
                         f'"caption_strategy": "textfile", "resolution": {args.resolution}, "resolution_type": "pixel", '
                         f'"minimum_image_size": 16, "crop": true, "crop_style": "center", "crop_aspect": "square"}}]')
        settings = Settings({"model_family": "sdxl", "pretrained_model_name_or_path": model,
                             "data_backend_config": dataset_file, "resolution": args.resolution,
                             "resolution_type": "pixel", "vae_dtype": "fp32"})
        family = get_family("sdxl")(settings)
        family.load(torch.device("cpu"), torch.float32)
        spec = training_datasets(load_dataset_config(dataset_file, settings))[0]
        storage = LocalStorage(images)
        index = discover_dataset(spec, storage, settings, progress=False)
        records = index.records

        pixels = [load_pixels(record, storage) for record in records]

        def bare_encode_rate() -> float:
            started = time.perf_counter()
            with torch.no_grad():
                for start in range(0, len(pixels), args.batch):
                    family.encode_images(torch.stack(pixels[start:start + args.batch]))
            return len(pixels) / (time.perf_counter() - started)

        with torch.no_grad():
            family.encode_images(torch.stack(pixels[:args.batch]))  # warm-up: first call sets up kernels
        bare_before = bare_encode_rate()

        cache = LatentCache(TensorStore(LocalStorage(os.path.join(root, "cache"))), family.fingerprint())
        started = time.perf_counter()
        report = cache.build(records, storage, family.encode_images, args.batch, progress=False)
        cache_rate = len(records) / (time.perf_counter() - started)
        assert not report.failed, report.failed
        # Bare rate measured before and after the cache build; the better one, so a load spike on a shared
        # machine cannot flatter the ratio.
        bare_rate = max(bare_before, bare_encode_rate())

    print(f"{len(records)} images at {args.resolution}px, VAE batch {args.batch} (tiny SDXL VAE, CPU)")
    print(f"bare VAE encode      : {bare_rate:8.1f} images/s")
    print(f"latent cache build   : {cache_rate:8.1f} images/s")
    print(f"ratio cache/bare     : {cache_rate / bare_rate:.3f}")


if __name__ == "__main__":
    main()
