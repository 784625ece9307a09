from dataclasses import dataclass

import pytest
import torch

from simpletuner.caching.store import CacheEntryError, TensorStore
from simpletuner.caching.text import TextEmbedCache
from simpletuner.caching.vae import LatentCache
from simpletuner.config.settings import Settings
from simpletuner.data.batches import BatchAssembler, BatchStream, Prefetcher, stack_padded
from simpletuner.data.sampler import MultiDatasetSampler
from simpletuner.data.storage.local import LocalStorage
from simpletuner.data.types import DatasetIndex, ImageRecord


@dataclass
class Spec:
    id: str
    caption_dropout_probability: float | None = None


def record(number, dataset_id="data", captions=("a red cube", "a cube that is red"), size=(64, 32)):
    return ImageRecord(dataset_id, f"img{number}.png", captions, original_size=(200, 100),
                       intermediate_size=(80, 40), crop_offset=(4, 8), target_size=size)


def text_for(caption):
    """Distinct embeds per caption, with a caption-length dependent sequence to exercise padding."""
    length = 2 + len(caption) % 3
    return {"prompt_embeds": torch.full((length, 4), float(len(caption))), "pooled": torch.full((4,), 1.0)}


def latent_for(rec):
    return torch.full((4, rec.target_size[1] // 8, rec.target_size[0] // 8), float(rec.path[3:-4]))


@pytest.fixture
def caches(tmp_path):
    latents = LatentCache(TensorStore(LocalStorage(str(tmp_path / "vae"))), "fp")
    text = TextEmbedCache(TensorStore(LocalStorage(str(tmp_path / "text"))), "fp")
    for caption in ("", "a red cube", "a cube that is red", "other"):
        text.put(caption, text_for(caption))
    return latents, text


def fill(latents, records):
    for rec in records:
        latents.put(rec, latent_for(rec))


def test_assemble_stacks_latents_text_and_sizes(caches):
    latents, text = caches
    records = [record(1), record(2)]
    fill(latents, records)
    assembler = BatchAssembler({"data": latents}, text, Settings({}))
    batch = assembler.assemble(records, torch.Generator().manual_seed(0))
    assert batch.latents.shape == (2, 4, 4, 8)
    assert batch.latents[1].unique().tolist() == [2.0]
    assert batch.text["pooled"].shape == (2, 4)
    assert batch.text["prompt_embeds"].shape[0] == 2
    assert batch.original_sizes == [(100, 200)] * 2
    assert batch.crop_coords == [(4, 8)] * 2
    assert batch.target_sizes == [(32, 64)] * 2
    assert batch.sample_ids == ["data:img1.png", "data:img2.png"]


def test_caption_choice_is_random_but_follows_the_generator(caches):
    _, text = caches
    assembler = BatchAssembler({}, text, Settings({}))
    rec = record(1)
    picks = [assembler.pick_caption(rec, torch.Generator().manual_seed(seed)) for seed in range(40)]
    assert set(picks) == set(rec.captions)
    again = [assembler.pick_caption(rec, torch.Generator().manual_seed(seed)) for seed in range(40)]
    assert picks == again


def test_caption_dropout_global_and_per_dataset(caches):
    _, text = caches
    generator = torch.Generator().manual_seed(1)
    always = BatchAssembler({}, text, Settings({"caption_dropout_probability": 1.0}))
    assert {always.pick_caption(record(i), generator) for i in range(20)} == {""}
    never = BatchAssembler({}, text, Settings({"caption_dropout_probability": 0.0}))
    assert "" not in {never.pick_caption(record(i), generator) for i in range(20)}
    mixed = BatchAssembler({}, text, Settings({"caption_dropout_probability": 0.0}),
                           specs={"data": Spec("data", caption_dropout_probability=1.0), "other": Spec("other")})
    assert mixed.pick_caption(record(1), generator) == ""
    assert mixed.pick_caption(record(1, dataset_id="other"), generator) != ""
    drops = sum(BatchAssembler({}, text, Settings({"caption_dropout_probability": 0.3}))
                .pick_caption(record(1), generator) == "" for _ in range(400))
    assert 80 < drops < 160


def test_dropped_captions_use_the_empty_caption_embeds(caches):
    latents, text = caches
    records = [record(1)]
    fill(latents, records)
    assembler = BatchAssembler({"data": latents}, text, Settings({"caption_dropout_probability": 1.0}))
    batch = assembler.assemble(records, torch.Generator().manual_seed(0))
    assert torch.equal(batch.text["prompt_embeds"][0], text_for("")["prompt_embeds"])


def test_missing_latents_without_a_vae_name_the_fix(caches):
    latents, text = caches
    assembler = BatchAssembler({"data": latents}, text, Settings({}))
    with pytest.raises(CacheEntryError, match="simpletuner cache"):
        assembler.assemble([record(1)], torch.Generator())


class FakeFamily:
    def __init__(self):
        self.encoded = 0

    def encode_images(self, pixels):
        self.encoded += pixels.shape[0]
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled[:, :1]], dim=1)  # 4 latent channels, like the cached ones


def fake_pixels(rec, storage):
    return torch.zeros(3, rec.target_size[1], rec.target_size[0])


def test_on_demand_encoding_fills_the_cache(caches):
    latents, text = caches
    family = FakeFamily()
    settings = Settings({"vae_cache_ondemand": True})
    assembler = BatchAssembler({"data": latents}, text, settings, family=family, storages={"data": None},
                               load_fn=fake_pixels)
    records = [record(1), record(2)]
    fill(latents, records[:1])
    batch = assembler.assemble(records, torch.Generator())
    assert family.encoded == 1 and batch.latents.shape == (2, 4, 4, 8)
    assembler.assemble(records, torch.Generator())
    assert family.encoded == 1  # the on-demand latent was stored
    assembler.flush()
    assert not LatentCache(latents.store, "fp").plan(records).to_encode

    disabled = BatchAssembler({"data": latents}, text, Settings({"vae_cache_disable": True}), family=family,
                              storages={"data": None}, load_fn=fake_pixels)
    disabled.assemble(records, torch.Generator())
    assert family.encoded == 3  # vae_cache_disable never reads the cache


def test_stack_padded_pads_token_dims():
    stacked = stack_padded([torch.ones(2, 3), torch.ones(4, 3)])
    assert stacked.shape == (2, 4, 3)
    assert stacked[0, 2:].abs().sum() == 0 and stacked[1].sum() == 12


def make_stream(caches, kind, **kwargs):
    latents, text = caches
    records = [record(i) for i in range(6)]
    fill(latents, records)
    sampler = MultiDatasetSampler({"data": DatasetIndex("data", records)}, {"data": Spec("data")}, 2, seed=3)
    assembler = BatchAssembler({"data": latents}, text, Settings({"caption_dropout_probability": 0.2}))
    return kind(sampler, assembler, seed=3, **kwargs)


def summary(prepared):
    return (prepared.epoch, prepared.epoch_step, prepared.batch.sample_ids,
            prepared.batch.text["prompt_embeds"][:, 0, 0].tolist())


def test_prefetcher_matches_the_plain_stream_and_resumes(caches):
    plain = make_stream(caches, BatchStream)
    expected = [summary(plain.next()) for _ in range(8)]
    assert [e[:2] for e in expected[:4]] == [(1, 1), (1, 2), (1, 3), (2, 1)]

    prefetched = make_stream(caches, Prefetcher, queue_length=3)
    try:
        got = [summary(prefetched.next()) for _ in range(5)]
        state = prefetched.state_dict()
    finally:
        prefetched.close()
    assert got == expected[:5]

    resumed = make_stream(caches, Prefetcher, queue_length=2)
    resumed.load_state_dict(state)
    try:
        assert [summary(resumed.next()) for _ in range(3)] == expected[5:]
    finally:
        resumed.close()


def test_prefetcher_passes_errors_to_the_consumer(caches):
    latents, text = caches
    records = [record(i) for i in range(4)]  # no latents cached
    sampler = MultiDatasetSampler({"data": DatasetIndex("data", records)}, {"data": Spec("data")}, 2, seed=3)
    prefetcher = Prefetcher(sampler, BatchAssembler({"data": latents}, text, Settings({})), seed=0)
    try:
        with pytest.raises(CacheEntryError):
            prefetcher.next()
    finally:
        prefetcher.close()
