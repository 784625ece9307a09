"""Trainer-wide dataset handling: captions, filtering, cache locations, bucketing, I/O workers, debugging."""

from simpletuner.config.option_types import BUILT, PLANNED, opt

GROUP = "Dataset handling"

OPTIONS = [
    # Captions
    opt("prepend_instance_prompt", "bool", False,
        "Put instance_prompt in front of every caption.", status=BUILT),
    opt("only_instance_prompt", "bool", False,
        "Ignore the dataset's captions and use instance_prompt alone for every sample.", status=BUILT),
    opt("data_aesthetic_score", "float", 7.0,
        "Fixed aesthetic score given to every sample as SDXL refiner micro-conditioning (refiner only).",
        status=PLANNED),
    # Filtering and clean-up
    opt("minimum_image_size", "float", None,
        "Skip images smaller than this; pixels (shorter edge or area) or megapixels, following "
        "resolution_type.", status=BUILT),
    opt("maximum_image_size", "float", None,
        "Images larger than this are first shrunk to target_downsample_size before cropping, so a crop "
        "keeps the scene; same units as resolution.", status=BUILT),
    opt("target_downsample_size", "float", None,
        "Size that images above maximum_image_size are shrunk to before cropping.", status=BUILT),
    opt("max_upscale_threshold", "float", None,
        "Largest allowed upscale as a fraction between 0 and 1 (0.2 = 20%); buckets needing more are "
        "dropped. Unset allows any upscale.", status=BUILT),
    opt("delete_unwanted_images", "bool", False,
        "Delete from storage the images that fail the size or aspect filters. Destructive.",
        status=BUILT),
    opt("delete_problematic_images", "bool", False,
        "Delete from storage the images that cannot be read or encoded. Destructive.", status=BUILT),
    opt("disable_bucket_pruning", "bool", False,
        "Keep aspect buckets that hold fewer images than one batch instead of dropping them; useful for "
        "tiny datasets but skews epoch counts.", status=BUILT),
    opt("allow_dataset_oversubscription", "bool", False,
        "Raise a dataset's repeats automatically when it is too small for the effective batch size "
        "(batch x GPUs x accumulation); explicit repeats are left alone.", status=BUILT),
    # Caches and discovery
    opt("cache_dir", "str", None,
        "Folder for downloaded models and datasets; unset uses the Hugging Face default.", status=BUILT),
    opt("cache_dir_text", "str", "cache",
        "Default folder for the text-embedding cache when a dataset does not set one.", status=BUILT),
    opt("cache_dir_vae", "str", "",
        "Default folder for cached VAE latents when a dataset does not set cache_dir_vae.", status=BUILT),
    opt("compress_disk_cache", "bool", False,
        "Compress cached latents and text embeddings on disk (saves much space on T5 embeddings, costs "
        "some speed). Existing caches must be removed to be rebuilt compressed.", status=BUILT),
    opt("keep_vae_loaded", "bool", False,
        "Keep the VAE in memory after caching instead of unloading it.", status=BUILT),
    opt("skip_file_discovery", "str", "",
        "Startup scans to skip, as a comma- or space-separated list of: aspect, vae, text, metadata. "
        "Faster resumes, but missing or mis-bucketed files go unnoticed.", status=BUILT),
    opt("preserve_data_backend_cache", "bool", False,
        "Reuse the saved file listing of each dataset instead of rescanning storage at startup; only for "
        "data that never changes.", status=BUILT),
    opt("override_dataset_config", "bool", False,
        "Accept a dataset whose cached settings differ from the current dataset config instead of "
        "stopping. Risky: stale caches may be used.", status=BUILT),
    opt("metadata_update_interval", "int", 3600,
        "Seconds between saves of the bucket index and metadata while they are being built.",
        status=BUILT),
    # Sampling and bucketing
    opt("data_backend_sampling", "str", "auto-weighting",
        "How datasets are chosen when there are several: only by their probability (uniform), or also "
        "weighted by their size (auto-weighting).",
        choices=("uniform", "auto-weighting"), status=BUILT),
    opt("aspect_bucket_disable_rebuild", "bool", False,
        "Do not rebuild the aspect bucket list each epoch when random cropping is used.", status=BUILT),
    opt("aspect_bucket_worker_count", "int", 12,
        "Worker count for building aspect buckets; CPU-bound, so about the number of CPU threads.",
        status=BUILT),
    opt("aspect_bucket_alignment", "int", 64,
        "Pixel multiple that bucket widths and heights are rounded to.",
        choices=(8, 16, 24, 32, 64), status=BUILT),
    # I/O and workers
    opt("image_processing_batch_size", "int", 32,
        "Images queued at a time for parallel resizing and cropping.", status=PLANNED),
    opt("write_batch_size", "int", 128,
        "Cache entries grouped into one write (helps S3 and network filesystems).", status=BUILT),
    opt("read_batch_size", "int", 25,
        "Images read ahead by the VAE cache builder.", status=PLANNED),
    opt("enable_multiprocessing", "bool", False,
        "Use processes rather than threads while gathering metadata.", status=PLANNED),
    opt("max_workers", "int", 32,
        "Threads or processes working in parallel while building the VAE cache.", status=BUILT),
    opt("aws_max_pool_connections", "int", 128,
        "Most simultaneous connections to an S3 bucket.", status=BUILT),
    opt("torch_num_threads", "int", 8,
        "Threads PyTorch may use for CPU maths (separate from data workers).", status=BUILT),
    opt("dataloader_prefetch", "bool", False,
        "Prepare upcoming batches in the background so the next one is ready when a step ends.",
        status=BUILT),
    opt("dataloader_prefetch_qlen", "int", 10,
        "Batches held ready per process when dataloader_prefetch is on.", status=BUILT),
    # Debugging
    opt("debug_aspect_buckets", "bool", False,
        "Log every aspect-bucketing decision (very verbose).", status=PLANNED),
    opt("debug_dataset_loader", "bool", False,
        "Log every dataset-loading step (very verbose).", status=PLANNED),
    opt("print_filenames", "bool", False,
        "Log each file name as it is processed, to find a file that breaks loading.", status=PLANNED),
    opt("print_sampler_statistics", "bool", False,
        "Log how often each dataset and bucket was drawn by the sampler.", status=PLANNED),
]
