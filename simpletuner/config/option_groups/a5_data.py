"""Global dataset defaults and the VAE-latent cache; per-dataset settings live in the dataloader config."""

from simpletuner.config.option_types import BUILT, PLANNED, opt

GROUP = "Data and caching"

OPTIONS = [
    opt("data_backend_config", "str", None,
        "Path to the dataloader JSON (multidatabackend.json) that lists the datasets to train on.",
        required=True, status=BUILT),
    opt("resolution", "float", 1024.0,
        "Training size for datasets that do not set their own: a pixel edge such as 1024, or megapixels "
        "such as 1.0 with resolution_type=area.", status=BUILT),
    opt("resolution_type", "str", "pixel_area",
        "How resolution is read: pixel sizes the shorter edge; pixel_area turns a pixel edge into the "
        "matching area for aspect buckets; area (deprecated) takes megapixels.",
        choices=("pixel", "area", "pixel_area"), status=BUILT),
    opt("aspect_bucket_rounding", "int", 2,
        "Decimal places aspect ratios are rounded to when sorting images into buckets; fewer places group "
        "more images together.", choices=tuple(range(1, 10)), status=BUILT),
    # Captions
    opt("caption_strategy", "str", "filename",
        "Default caption source for datasets that do not choose one: cleaned-up file name, a matching .txt "
        "file, the instance prompt, or a parquet column.",
        choices=("filename", "textfile", "instance_prompt", "parquet"), status=BUILT),
    opt("instance_prompt", "str", None,
        "Caption used for every image of a dataset captioned by instance prompt that does not set its own.",
        status=BUILT),
    opt("parquet_caption_column", "str", None,
        "Parquet column holding captions; unset means the column named caption.", status=BUILT),
    opt("parquet_filename_column", "str", None,
        "Parquet column holding the image file names or paths.", status=BUILT),
    opt("caption_dropout_probability", "float", None,
        "Chance (0-1) that a sample's caption is replaced by the empty caption, which also drops SDXL size "
        "conditioning; unset or 0 never drops captions.", status=BUILT),
    opt("tokenizer_max_length", "int", None,
        "Advanced: override how many tokens the text encoders receive; unset keeps each family's "
        "length.", status=BUILT),
    opt("conditioning_multidataset_sampling", "str", "random",
        "With several conditioning datasets, use all of them together for each sample (combined) or pick "
        "one at random per sample (random).", choices=("combined", "random"), status=BUILT,
        planned_choices=("combined",)),
    opt("ignore_missing_files", "bool", False,
        "Keep training when image files listed in a dataset's cache have disappeared, instead of removing "
        "them from the buckets.", status=PLANNED),
    # VAE latent cache
    opt("vae_batch_size", "int", 4,
        "Images encoded per VAE call while building the latent cache.", status=BUILT),
    opt("vae_cache_ondemand", "bool", False,
        "Encode latents during training when a batch needs them rather than all up front.", status=BUILT),
    opt("vae_cache_disable", "bool", False,
        "Never write latents to disk; implies vae_cache_ondemand.", status=BUILT),
    opt("vae_cache_scan_behaviour", "str", "recreate",
        "What a scan_for_errors pass does with a cached latent that disagrees with its bucket: delete it so "
        "it is rebuilt (recreate), or update the bucket to match it (sync).",
        choices=("recreate", "sync"), status=BUILT),
    opt("vae_enable_slicing", "bool", False,
        "Let the VAE process a batch one image at a time to lower peak memory.", status=BUILT),
    opt("vae_enable_tiling", "bool", False,
        "Let the VAE encode and decode large images in overlapping tiles to lower peak memory.",
        status=BUILT),
    opt("vae_enable_patch_conv", "bool", False,
        "Run the video VAE's 3D convolutions patch by patch (HunyuanVideo VAE) to lower peak memory; a little "
        "slower.", status=PLANNED),
]
