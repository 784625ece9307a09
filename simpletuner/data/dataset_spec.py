"""The dataset keys of multidatabackend.json and the ``DatasetSpec`` they become.

``KEYS`` is the one table of documented dataset keys: the kind of value each
takes, its default, its choices, and whether it is built yet. ``DatasetSpec``
has one attribute per key, named like the JSON key. dataset_config.py parses
and validates a file against this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KeyRule:
    kind: str  # str | path | bool | int | number | numbers | ids | mapping | any | filter_list
    default: Any = None
    choices: tuple = ()
    planned_choices: tuple = ()  # values that parse but are not built yet
    planned: bool = False  # any non-default value is "not implemented yet"
    low: float | None = None
    high: float | None = None


_CONDITIONING_TYPES = ("controlnet", "mask", "reference_strict", "reference_loose")
_DATASET_TYPES = ("image", "video", "audio", "text_embeds", "image_embeds", "conditioning_image_embeds",
                  "conditioning", "eval")
_CAPTION_STRATEGIES = ("filename", "textfile", "instanceprompt", "parquet", "csv", "huggingface")

KEYS: dict[str, KeyRule] = {
    "id": KeyRule("str"),
    "type": KeyRule("str", "local", ("local", "aws", "csv", "huggingface"), ("csv", "huggingface")),
    "dataset_type": KeyRule("str", "image", _DATASET_TYPES,
                         ("video", "audio", "conditioning_image_embeds")),
    "disabled": KeyRule("bool", False),
    "default": KeyRule("bool", False),
    "cache_dir": KeyRule("path"),
    "write_batch_size": KeyRule("int", low=1),
    "text_embeds": KeyRule("str"),
    "image_embeds": KeyRule("str"),
    "conditioning_image_embeds": KeyRule("str", planned=True),
    "cache_dir_conditioning_image_embeds": KeyRule("path", planned=True),
    "conditioning_image_embed_batch_size": KeyRule("int", planned=True),
    "audio": KeyRule("mapping", planned=True),
    "video": KeyRule("mapping", planned=True),
    "conditioning_type": KeyRule("str", None, _CONDITIONING_TYPES, ("reference_strict", "reference_loose")),
    "source_dataset_id": KeyRule("str"),
    "conditioning_data": KeyRule("ids"),
    "conditioning": KeyRule("any", planned=True),
    "instance_data_dir": KeyRule("path"),
    "aws_bucket_name": KeyRule("str"),
    "aws_region_name": KeyRule("str"),
    "aws_endpoint_url": KeyRule("str"),
    "aws_access_key_id": KeyRule("str"),
    "aws_secret_access_key": KeyRule("str"),
    "aws_data_prefix": KeyRule("str", ""),
    "caption_strategy": KeyRule("str", None, _CAPTION_STRATEGIES, ("csv", "huggingface")),
    "disable_multiline_split": KeyRule("bool", False),
    "caption_shuffle": KeyRule("mapping"),
    "caption_filter_list": KeyRule("filter_list"),
    "metadata_backend": KeyRule("str", "discovery", ("discovery", "parquet", "huggingface"), ("parquet", "huggingface")),
    "metadata_update_interval": KeyRule("int", low=1),
    "parquet": KeyRule("mapping"),
    "crop": KeyRule("bool", False),
    "crop_style": KeyRule("str", "random", ("random", "center", "corner", "face"), ("face",)),
    "crop_aspect": KeyRule("str", "square", ("square", "preserve", "closest", "random")),
    "crop_aspect_buckets": KeyRule("numbers"),
    "resolution": KeyRule("number", low=0),
    "resolution_type": KeyRule("str", None, ("pixel", "area", "pixel_area")),
    "minimum_image_size": KeyRule("number", low=0),
    "maximum_image_size": KeyRule("number", low=0),
    "target_downsample_size": KeyRule("number", low=0),
    "minimum_aspect_ratio": KeyRule("number", low=0),
    "maximum_aspect_ratio": KeyRule("number", low=0),
    "max_upscale_threshold": KeyRule("number", low=0, high=1),
    "instance_prompt": KeyRule("str"),
    "prepend_instance_prompt": KeyRule("bool"),
    "only_instance_prompt": KeyRule("bool"),
    "repeats": KeyRule("int", 0, low=0),
    "probability": KeyRule("number", 1.0, low=0),
    "ignore_epochs": KeyRule("bool", False),
    "max_num_samples": KeyRule("int", low=1),
    "start_epoch": KeyRule("int", 1, low=0),
    "start_step": KeyRule("int", 0, low=0, planned=True),
    "end_epoch": KeyRule("int", low=0),
    "end_step": KeyRule("int", low=0, planned=True),
    "is_regularisation_data": KeyRule("bool", False),
    "slider_strength": KeyRule("number", planned=True),
    "delete_unwanted_images": KeyRule("bool"),
    "delete_problematic_images": KeyRule("bool"),
    "cache_dir_vae": KeyRule("path"),
    "cache_file_suffix": KeyRule("str", planned=True),
    "vae_cache_clear_each_epoch": KeyRule("bool"),
    "scan_for_errors": KeyRule("bool", False),
    "skip_file_discovery": KeyRule("str", ""),
    "preserve_data_backend_cache": KeyRule("bool"),
    "hash_filenames": KeyRule("bool"),  # documented as ignored: cache names are always hashed
    # Hugging Face and CSV sources (their dataset types are not built yet).
    "dataset_name": KeyRule("str", planned=True),
    "split": KeyRule("str", planned=True),
    "revision": KeyRule("str", planned=True),
    "image_column": KeyRule("str", planned=True),
    "caption_column": KeyRule("any", planned=True),
    "fallback_caption_column": KeyRule("str", planned=True),
    "streaming": KeyRule("bool", planned=True),
    "num_proc": KeyRule("int", planned=True),
    "huggingface": KeyRule("mapping", planned=True),
    "config": KeyRule("mapping", planned=True),
    "csv_file": KeyRule("path", planned=True),
    "csv_caption_column": KeyRule("str", planned=True),
    "csv_cache_dir": KeyRule("path", planned=True),
}
KEY_ALIASES = {"disable": "disabled", "is_regularization_data": "is_regularisation_data"}
VALUE_ALIASES = {"caption_strategy": {"instance_prompt": "instanceprompt"}, "crop_style": {"centre": "center"}}
PARQUET_KEYS = ("path", "filename_column", "caption_column", "fallback_caption_column", "width_column",
                 "height_column", "identifier_includes_extension")
SHUFFLE_KEYS = ("enable", "count", "seed", "split_on", "position_start", "include_original")
PATH_KEYS = ("instance_data_dir", "cache_dir", "cache_dir_vae")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of multidatabackend.json, with global fallbacks applied.

    Attributes named like the JSON keys hold the effective value. The last
    block holds values taken from the global settings that the dataset code
    needs, plus where the entry came from.
    """

    id: str
    type: str = "local"
    dataset_type: str = "image"
    disabled: bool = False
    default: bool = False
    cache_dir: str | None = None
    write_batch_size: int | None = None
    text_embeds: str | None = None
    image_embeds: str | None = None
    conditioning_image_embeds: str | None = None
    cache_dir_conditioning_image_embeds: str | None = None
    conditioning_image_embed_batch_size: int | None = None
    audio: dict | None = None
    video: dict | None = None
    conditioning_type: str | None = None
    source_dataset_id: str | None = None
    conditioning_data: tuple[str, ...] | None = None
    conditioning: Any = None
    instance_data_dir: str | None = None
    aws_bucket_name: str | None = None
    aws_region_name: str | None = None
    aws_endpoint_url: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_data_prefix: str = ""
    caption_strategy: str = "filename"
    disable_multiline_split: bool = False
    caption_shuffle: dict | None = None
    caption_filter_list: tuple[str, ...] | str | None = None  # inline entries, or a file path
    metadata_backend: str = "discovery"
    metadata_update_interval: int | None = None
    parquet: dict | None = None
    crop: bool = False
    crop_style: str = "random"
    crop_aspect: str = "square"
    crop_aspect_buckets: tuple[float, ...] | None = None
    resolution: float = 1024
    resolution_type: str = "pixel_area"
    minimum_image_size: float | None = None
    maximum_image_size: float | None = None
    target_downsample_size: float | None = None
    minimum_aspect_ratio: float | None = None
    maximum_aspect_ratio: float | None = None
    max_upscale_threshold: float | None = None
    instance_prompt: str | None = None
    prepend_instance_prompt: bool = False
    only_instance_prompt: bool = False
    repeats: int = 0
    probability: float = 1.0
    ignore_epochs: bool = False
    max_num_samples: int | None = None
    start_epoch: int = 1
    start_step: int = 0
    end_epoch: int | None = None
    end_step: int | None = None
    is_regularisation_data: bool = False
    slider_strength: float | None = None
    delete_unwanted_images: bool = False
    delete_problematic_images: bool = False
    cache_dir_vae: str | None = None
    cache_file_suffix: str | None = None
    vae_cache_clear_each_epoch: bool = False
    scan_for_errors: bool = False
    skip_file_discovery: tuple[str, ...] = ()
    preserve_data_backend_cache: bool = False
    hash_filenames: bool | None = None
    dataset_name: str | None = None
    split: str | None = None
    revision: str | None = None
    image_column: str | None = None
    caption_column: Any = None
    fallback_caption_column: str | None = None
    streaming: bool | None = None
    num_proc: int | None = None
    huggingface: dict | None = None
    config: dict | None = None
    csv_file: str | None = None
    csv_caption_column: str | None = None
    csv_cache_dir: str | None = None
    # From the global settings (not dataset keys).
    aspect_bucket_alignment: int = 64
    aspect_bucket_rounding: int = 2
    compress_disk_cache: bool = False
    seed: int = 0
    # Where the entry came from.
    config_file: str = ""
    explicit_keys: frozenset[str] = field(default_factory=frozenset)  # keys the user wrote (canonical names)
    implicit: bool = False  # created by the loader, not written by the user

    def where(self, key: str | None = None) -> str:
        """'file: dataset 'x'' (and ': key'), the prefix of every message about this dataset."""
        text = f"{self.config_file}: dataset '{self.id}'" if self.config_file else f"dataset '{self.id}'"
        return f"{text}: {key}" if key else text
