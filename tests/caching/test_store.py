import os

import pytest
import torch

from simpletuner.caching.store import COMPRESSED_MAGIC, CacheEntryError, CacheEntryMissing, TensorStore
from simpletuner.data.storage.local import LocalStorage


def make_store(tmp_path, compress=False):
    return TensorStore(LocalStorage(str(tmp_path / "cache")), compress=compress)


def test_round_trip_keeps_tensors_dtypes_and_meta(tmp_path):
    store = make_store(tmp_path)
    tensors = {"latents": torch.randn(4, 8, 8), "pooled": torch.randn(16).to(torch.bfloat16)}
    store.save("abc123", tensors, {"path": "a/b.png", "size": [64, 64]})
    loaded, meta = store.load("abc123")
    assert set(loaded) == {"latents", "pooled"}
    assert torch.equal(loaded["latents"], tensors["latents"])
    assert loaded["pooled"].dtype == torch.bfloat16 and torch.equal(loaded["pooled"], tensors["pooled"])
    assert meta == {"path": "a/b.png", "size": [64, 64]}
    assert store.exists("abc123")
    assert os.path.exists(tmp_path / "cache" / "ab" / "abc123.safetensors")
    assert store.keys() == {"abc123"}


def test_views_of_bigger_tensors_are_saved_alone(tmp_path):
    store = make_store(tmp_path)
    batch = torch.arange(60.0).reshape(3, 4, 5)
    store.save("view01", {"latents": batch[1]}, {})
    assert torch.equal(store.load("view01")[0]["latents"], batch[1])


def test_compressed_entries_are_smaller_and_readable_by_any_store(tmp_path):
    compressed = make_store(tmp_path, compress=True)
    plain = make_store(tmp_path / "plain")
    tensors = {"prompt_embeds": torch.zeros(77, 256)}  # mostly empty, like padded T5 embeds
    compressed.save("zz01", tensors, {"caption": "x"})
    plain.save("zz01", tensors, {"caption": "x"})
    packed = (tmp_path / "cache" / "zz" / "zz01.safetensors").read_bytes()
    unpacked = (tmp_path / "plain" / "cache" / "zz" / "zz01.safetensors").read_bytes()
    assert packed.startswith(COMPRESSED_MAGIC)
    assert len(packed) < len(unpacked) / 10
    reader = make_store(tmp_path, compress=False)
    loaded, meta = reader.load("zz01")
    assert torch.equal(loaded["prompt_embeds"], tensors["prompt_embeds"]) and meta == {"caption": "x"}


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    store.save("keep01", {"a": torch.ones(2)}, {})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("simpletuner.data.storage.local.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.save("lost01", {"a": torch.ones(1000)}, {})
    monkeypatch.undo()
    assert not store.exists("lost01")
    leftovers = [name for _, _, files in os.walk(tmp_path) for name in files]
    assert sorted(leftovers) == ["keep01.safetensors"]


def test_bad_values_are_refused_before_writing(tmp_path):
    store = make_store(tmp_path)
    with pytest.raises(TypeError, match="'caption'"):
        store.save("bad001", {"caption": "not a tensor"}, {})
    assert not store.exists("bad001")
    with pytest.raises(ValueError, match="invalid cache key"):
        store.save("../escape", {"a": torch.ones(1)}, {})


def test_corrupt_and_missing_entries_raise_errors_naming_the_file(tmp_path):
    store = make_store(tmp_path)
    store.save("cc0001", {"a": torch.ones(3)}, {})
    path = tmp_path / "cache" / "cc" / "cc0001.safetensors"
    path.write_bytes(path.read_bytes()[:20])  # truncated
    with pytest.raises(CacheEntryError) as caught:
        store.load("cc0001")
    assert str(path) in str(caught.value)
    path.write_bytes(COMPRESSED_MAGIC + b"not zlib")
    with pytest.raises(CacheEntryError, match="unreadable"):
        store.load("cc0001")
    with pytest.raises(CacheEntryMissing):
        store.load("dd0001")
    store.delete("cc0001")
    assert not store.exists("cc0001")
