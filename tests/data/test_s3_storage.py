"""S3Storage against moto's HTTP server on loopback (a real boto3 client, no in-process mocking)."""

import io
import json
import pickle

import pytest
import torch
from PIL import Image

from helpers.s3 import KEYS, moto_endpoint, s3_client
from simpletuner.config.settings import Settings
from simpletuner.data.dataset_config import load_dataset_config
from simpletuner.data.discovery import bucket_index_name, discover_dataset
from simpletuner.data.storage.base import Storage
from simpletuner.data.storage.factory import make_cache_storage, make_storage
from simpletuner.data.storage.s3 import S3Storage
from simpletuner.data.transforms import load_pixels

pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def endpoint():
    with moto_endpoint() as url:
        yield url


@pytest.fixture(autouse=True)
def fake_credentials(monkeypatch):
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEYS["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEYS["secret_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", KEYS["region"])


@pytest.fixture
def bucket(endpoint, request):
    name = "bucket-" + request.node.name.replace("_", "-")[:40].lower()
    client = s3_client(endpoint)
    client.create_bucket(Bucket=name)
    return name, client


def png_bytes(size, color=(10, 120, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def test_storage_round_trip(endpoint, bucket):
    name, client = bucket
    storage = S3Storage(name, prefix="data", endpoint_url=endpoint, **KEYS)
    assert isinstance(storage, Storage)
    storage.write_bytes("a/one.png", b"first")
    storage.write_bytes("two.txt", b"second")
    storage.write_bytes(".hidden/three.png", b"hidden")
    client.put_object(Bucket=name, Key="elsewhere/x.png", Body=b"outside the prefix")
    assert storage.list_files() == ["a/one.png", "two.txt"]
    assert storage.list_files(extensions=["png"]) == ["a/one.png"]
    assert storage.list_files("a") == ["a/one.png"]
    assert storage.read_bytes("a/one.png") == b"first"
    assert storage.exists("two.txt") and not storage.exists("missing.txt")
    before = storage.stamp("a/one.png")
    storage.write_bytes("a/one.png", b"changed content")
    assert storage.stamp("a/one.png") != before
    assert S3Storage(name, prefix="data", endpoint_url=endpoint, **KEYS).stamp("a/one.png") == storage.stamp("a/one.png")
    storage.delete("two.txt")
    assert not storage.exists("two.txt")
    with pytest.raises(FileNotFoundError, match=f"s3://{name}/data/two.txt"):
        storage.read_bytes("two.txt")
    assert storage.describe("x/y.png") == f"s3://{name}/data/x/y.png"
    assert client.get_object(Bucket=name, Key="data/a/one.png")["Body"].read() == b"changed content"


def test_storage_survives_pickling(endpoint, bucket):
    name, _ = bucket
    storage = S3Storage(name, endpoint_url=endpoint, **KEYS)
    storage.write_bytes("file.bin", b"payload")
    copy = pickle.loads(pickle.dumps(storage))
    assert copy.read_bytes("file.bin") == b"payload"


def write_config(tmp_path, endpoint, bucket_name, **extra) -> str:
    entries = [
        {"id": "cloud", "type": "aws", "aws_bucket_name": bucket_name, "aws_endpoint_url": endpoint,
         "aws_region_name": KEYS["region"], "aws_access_key_id": KEYS["access_key"],
         "aws_secret_access_key": KEYS["secret_key"], "aws_data_prefix": "images", "caption_strategy": "textfile",
         "resolution": 256, "resolution_type": "pixel_area", "minimum_image_size": 128,
         "cache_dir_vae": "cache/vae", **extra},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(tmp_path / "text")},
    ]
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return str(path)


def test_discovery_through_s3(tmp_path, endpoint, bucket):
    name, client = bucket
    for key, size in {"cat.png": (256, 256), "sub/wide.png": (384, 256), "small.png": (64, 64)}.items():
        client.put_object(Bucket=name, Key=f"images/{key}", Body=png_bytes(size))
        client.put_object(Bucket=name, Key=f"images/{key[:-4]}.txt", Body=f"caption of {key}".encode())
    client.put_object(Bucket=name, Key="images/broken.png", Body=b"\x89PNG\r\n\x1a\n not really")
    settings = Settings({})
    spec = load_dataset_config(write_config(tmp_path, endpoint, name), settings)[0]
    storage = make_storage(spec, settings)
    index = discover_dataset(spec, storage, settings, progress=False)
    assert {r.path: r.target_size for r in index.records} == {"cat.png": (256, 256), "sub/wide.png": (320, 192)}
    assert {r.path: r.reason.split(":")[0] for r in index.rejected} == {"small.png": "too small",
                                                                        "broken.png": "unreadable image"}
    assert index.records[0].captions == ("caption of cat.png",)
    saved = json.loads(client.get_object(Bucket=name, Key=f"images/{bucket_index_name(spec)}")["Body"].read())
    assert set(saved["files"]) == {"cat.png", "sub/wide.png", "small.png", "broken.png"}
    again = discover_dataset(spec, make_storage(spec, settings), settings, progress=False)
    assert again.records == index.records
    pixels = load_pixels(index.records[1], storage)
    assert pixels.shape == (3, 192, 320)


def test_vae_cache_lives_in_the_same_bucket(tmp_path, endpoint, bucket):
    name, client = bucket
    settings = Settings({})
    specs = load_dataset_config(write_config(tmp_path, endpoint, name), settings)
    cache = make_storage(specs[0], settings, purpose="vae_cache", datasets=specs)
    cache.write_bytes("entry.bin", b"latent")
    assert client.get_object(Bucket=name, Key="images/cache/vae/entry.bin")["Body"].read() == b"latent"
    text_cache = make_storage(specs[1], settings, purpose="text_cache")
    text_cache.write_bytes("embed.bin", b"text")
    assert (tmp_path / "text" / "embed.bin").read_bytes() == b"text"
    local_cache = make_cache_storage(specs[1], settings, str(tmp_path / "other"))
    local_cache.write_bytes("x", b"1")
    assert (tmp_path / "other" / "x").exists()


def test_image_embeds_dataset_moves_the_vae_cache_to_local_disk(tmp_path, endpoint, bucket):
    name, _ = bucket
    config = json.loads(open(write_config(tmp_path, endpoint, name, image_embeds="vae-store",
                                          cache_dir_vae=str(tmp_path / "vae"))).read())
    config.append({"id": "vae-store", "type": "local", "dataset_type": "image_embeds"})
    path = tmp_path / "linked.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    specs = load_dataset_config(str(path), Settings({}))
    cache = make_storage(specs[0], Settings({}), purpose="vae_cache", datasets=specs)
    cache.write_bytes("entry.bin", b"latent")
    assert (tmp_path / "vae" / "entry.bin").read_bytes() == b"latent"


def test_latents_are_cached_into_the_bucket_and_reused(tmp_path, endpoint, bucket):
    from simpletuner.caching.store import TensorStore
    from simpletuner.caching.vae import LatentCache

    name, client = bucket
    for key in ("a.png", "b.png"):
        client.put_object(Bucket=name, Key=f"images/{key}", Body=png_bytes((256, 256)))
        client.put_object(Bucket=name, Key=f"images/{key[:-4]}.txt", Body=b"a caption")
    settings = Settings({})
    specs = load_dataset_config(write_config(tmp_path, endpoint, name), settings)
    storage = make_storage(specs[0], settings)
    records = discover_dataset(specs[0], storage, settings, progress=False).records
    cache = LatentCache(TensorStore(make_storage(specs[0], settings, purpose="vae_cache", datasets=specs)), "model-a")

    def encode(pixels):  # stands in for a VAE: 8x downsampled means of the pixels
        return torch.nn.functional.avg_pool2d(pixels, 8)[:, :1].repeat(1, 4, 1, 1)

    report = cache.build(records, storage, encode, batch_size=2, progress=False)
    assert not report.failed
    keys = [obj["Key"] for obj in client.list_objects_v2(Bucket=name, Prefix="images/cache/vae/")["Contents"]]
    assert sum(key.endswith(".safetensors") for key in keys) == 2
    assert cache.get(records[0]).shape == (4, 32, 32)
    assert not cache.plan(records).to_encode  # a second build would encode nothing
