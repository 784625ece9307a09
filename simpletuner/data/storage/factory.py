"""Build the Storage for a dataset's data or for one of its caches.

Where things live, following the reference:
- data: ``instance_data_dir`` (local) or ``aws_data_prefix`` in the bucket (aws).
- VAE cache of an image dataset: ``cache_dir_vae``, on the storage of the
  ``image_embeds`` dataset when one is linked, else on the image dataset's own
  storage (so on an aws dataset it is a key prefix in the same bucket).
- text cache of a text_embeds dataset: ``cache_dir`` (local), or
  ``aws_data_prefix``/``cache_dir`` in its bucket (aws).
"""

from __future__ import annotations

import posixpath
from typing import Sequence

from simpletuner.data.dataset_config import DatasetConfigError, find_dataset
from simpletuner.data.dataset_spec import DatasetSpec
from simpletuner.data.storage.base import Storage
from simpletuner.data.storage.local import LocalStorage

PURPOSES = ("data", "vae_cache", "text_cache")


def make_storage(spec: DatasetSpec, settings, purpose: str = "data",
                 datasets: Sequence[DatasetSpec] = ()) -> Storage:
    """Storage for a dataset's images ("data"), its VAE cache ("vae_cache") or its text cache ("text_cache").

    ``datasets`` (all specs of the file) is needed for "vae_cache" when the
    dataset links an ``image_embeds`` dataset.
    """
    if purpose == "data":
        _require_supported(spec)
        if spec.type == "aws":
            return _s3(spec, settings, spec.aws_data_prefix)
        return LocalStorage(spec.instance_data_dir)
    if purpose == "vae_cache":
        owner = find_dataset(list(datasets), spec.image_embeds) if spec.image_embeds else spec
        return make_cache_storage(owner, settings, spec.cache_dir_vae)
    if purpose == "text_cache":
        return make_cache_storage(spec, settings, spec.cache_dir or "")
    raise ValueError(f"unknown storage purpose {purpose!r}; use one of {', '.join(PURPOSES)}")


def make_cache_storage(spec: DatasetSpec, settings, folder: str) -> Storage:
    """A cache folder on the same kind of storage as ``spec``: a local path, or a key prefix in its bucket."""
    _require_supported(spec)
    if spec.type == "aws":
        prefix = posixpath.join(spec.aws_data_prefix or "", (folder or "").lstrip("/"))
        return _s3(spec, settings, prefix)
    if not folder:
        raise DatasetConfigError([f"{spec.where()}: no cache folder is configured; set cache_dir_vae "
                                  "(image datasets) or cache_dir (text_embeds datasets)."])
    return LocalStorage(folder)


def _require_supported(spec: DatasetSpec) -> None:
    if spec.type not in ("local", "aws"):
        raise DatasetConfigError([f"{spec.where('type')} is not implemented yet (got {spec.type!r}); "
                                  "use \"local\" or \"aws\"."])


def _s3(spec: DatasetSpec, settings, prefix: str) -> Storage:
    from simpletuner.data.storage.s3 import S3Storage

    return S3Storage(
        bucket=spec.aws_bucket_name,
        prefix=prefix,
        endpoint_url=spec.aws_endpoint_url,
        region=spec.aws_region_name,
        access_key=spec.aws_access_key_id,
        secret_key=spec.aws_secret_access_key,
        max_pool_connections=int(getattr(settings, "aws_max_pool_connections", 128) or 128),
    )
