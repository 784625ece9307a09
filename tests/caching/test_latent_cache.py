import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers.images import write_noise_images
from simpletuner.caching.store import TensorStore
from simpletuner.caching.vae import (REASON_BROKEN, REASON_FILE_CHANGED, REASON_GEOMETRY, REASON_MISSING,
                                     REASON_MODEL, REASON_NEW, LatentCache)
from simpletuner.data.storage.local import LocalStorage
from simpletuner.data.types import ImageRecord


class FakeVae:
    """Stands in for family.encode_images: 8x average pooling, remembering every batch shape."""

    def __init__(self):
        self.batches = []

    def __call__(self, pixels):
        self.batches.append(tuple(pixels.shape))
        return F.avg_pool2d(pixels, 8)

    @property
    def images(self):
        return sum(shape[0] for shape in self.batches)


def load_resized(record, storage):
    with Image.open(storage.describe(record.path)) as image:
        image = image.convert("RGB").resize(record.target_size)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "images"
    write_noise_images(folder, [(64, 64)] * 3 + [(96, 64)] * 2, seed=0, stem="img")
    storage = LocalStorage(str(folder))
    records = [make_record(storage, path) for path in storage.list_files()]
    return storage, records


def make_record(storage, path):
    with Image.open(storage.describe(path)) as image:
        size = image.size
    return ImageRecord("data", path, (f"caption of {path}",), size, size, (0, 0), size,
                       source_stamp=storage.stamp(path))


def make_cache(tmp_path, fingerprint="model-a"):
    return LatentCache(TensorStore(LocalStorage(str(tmp_path / "vae"))), fingerprint, name="data")


def test_build_encodes_by_bucket_and_second_build_encodes_nothing(tmp_path, dataset):
    storage, records = dataset
    cache, vae = make_cache(tmp_path), FakeVae()
    assert {reason for _, reason in cache.plan(records).to_encode} == {REASON_NEW}
    report = cache.build(records, storage, vae, batch_size=2, progress=False, load_fn=load_resized)
    assert report.encoded == 5 and not report.failed
    assert sorted(vae.batches) == [(1, 3, 64, 64), (2, 3, 64, 64), (2, 3, 64, 96)]
    expected = F.avg_pool2d(load_resized(records[0], storage)[None], 8)[0]
    assert torch.allclose(cache.get(records[0]), expected)

    again = make_cache(tmp_path)  # a fresh process: only what is on disk counts
    second = FakeVae()
    assert again.build(records, storage, second, batch_size=2, progress=False, load_fn=load_resized).encoded == 0
    assert second.batches == []
    assert len(again.plan(records).cached) == 5


def test_changed_target_size_is_re_encoded_and_old_entry_removed(tmp_path, dataset):
    storage, records = dataset
    cache = make_cache(tmp_path)
    cache.build(records, storage, FakeVae(), batch_size=4, progress=False, load_fn=load_resized)
    entries_before = cache.store.keys()
    resized = [dataclasses.replace(records[0], target_size=(32, 32), intermediate_size=(32, 32))] + records[1:]
    plan = make_cache(tmp_path).plan(resized)
    assert plan.to_encode == [(resized[0], REASON_GEOMETRY)]
    assert "resolution or crop changed: 1" in plan.summary()
    vae = FakeVae()
    cache = make_cache(tmp_path)
    cache.build(resized, storage, vae, batch_size=4, progress=False, load_fn=load_resized)
    assert vae.batches == [(1, 3, 32, 32)]
    assert cache.get(resized[0]).shape == (3, 4, 4)
    assert len(cache.store.keys()) == len(entries_before)  # replaced, not piled up


def test_reasons_tell_model_file_and_missing_apart(tmp_path, dataset):
    storage, records = dataset
    make_cache(tmp_path).build(records, storage, FakeVae(), batch_size=4, progress=False, load_fn=load_resized)
    plan = make_cache(tmp_path, fingerprint="model-b").plan(records)
    assert plan.reasons() == {REASON_MODEL: 5}

    cache = make_cache(tmp_path)
    touched = dataclasses.replace(records[1], source_stamp="999-1")
    cache.store.delete(cache.key_for(records[2]))
    extra = dataclasses.replace(records[0], path="new.png")
    plan = cache.plan([records[0], touched, records[2], extra])
    assert [reason for _, reason in plan.to_encode] == [REASON_FILE_CHANGED, REASON_MISSING, REASON_NEW]
    assert plan.cached == [records[0]]


def test_unreadable_images_are_reported_and_others_still_encoded(tmp_path, dataset):
    storage, records = dataset
    (tmp_path / "images" / "img1.png").write_bytes(b"this is not a png")
    report = make_cache(tmp_path).build(records, storage, FakeVae(), batch_size=4, progress=False,
                                        load_fn=load_resized)
    assert report.encoded == 4
    assert [failure.path for failure in report.failed] == ["img1.png"]


def test_scan_recreate_removes_broken_entries(tmp_path, dataset):
    storage, records = dataset
    cache = make_cache(tmp_path)
    cache.build(records, storage, FakeVae(), batch_size=4, progress=False, load_fn=load_resized)
    broken = tmp_path / "vae" / cache.store.path_for(cache.key_for(records[3]))
    broken.write_bytes(b"garbage")
    wrong_shape = records[4]
    cache.store.save(cache.key_for(wrong_shape), {"latents": torch.zeros(3, 5, 5)},
                     {"geometry": [96, 64, 0, 0, 96, 64]})
    result = cache.scan(records, "recreate", progress=False)
    assert set(result.problems) == {records[3].path, records[4].path}
    assert "do not match the bucket" in result.problems[records[4].path]
    assert cache.plan(records).reasons() == {REASON_BROKEN: 2}
    vae = FakeVae()
    cache.build(records, storage, vae, batch_size=4, progress=False, load_fn=load_resized)
    assert vae.images == 2 and not cache.plan(records).to_encode


def test_scan_sync_adopts_existing_entries_instead_of_re_encoding(tmp_path, dataset):
    storage, records = dataset
    make_cache(tmp_path).build(records, storage, FakeVae(), batch_size=4, progress=False, load_fn=load_resized)
    squared = [dataclasses.replace(r, target_size=(32, 32), intermediate_size=(32, 32)) for r in records]
    cache = make_cache(tmp_path)
    result = cache.scan(squared, "sync", progress=False)
    assert result.adopted == 5 and not result.problems
    assert [r.target_size for r in result.records] == [r.target_size for r in records]
    assert not cache.plan(result.records).to_encode
    with pytest.raises(ValueError, match="vae_cache_scan_behaviour"):
        cache.scan(records, "fix-it")


def test_clear_removes_entries_and_manifest(tmp_path, dataset):
    storage, records = dataset
    cache = make_cache(tmp_path)
    cache.build(records, storage, FakeVae(), batch_size=4, progress=False, load_fn=load_resized)
    assert cache.clear() == 5
    assert cache.store.keys() == set()
    assert make_cache(tmp_path).plan(records).reasons() == {REASON_NEW: 5}


def test_put_and_compressed_store(tmp_path, dataset):
    _, records = dataset
    cache = LatentCache(TensorStore(LocalStorage(str(tmp_path / "z")), compress=True), "m")
    cache.put(records[0], torch.ones(4, 8, 8))
    cache.flush()
    again = LatentCache(TensorStore(LocalStorage(str(tmp_path / "z"))), "m")
    assert torch.equal(again.get(records[0]), torch.ones(4, 8, 8))
    assert again.plan(records[:1]).cached == records[:1]
