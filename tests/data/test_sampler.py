import logging
from collections import Counter
from dataclasses import dataclass

import pytest

from simpletuner.config.settings import Settings
from simpletuner.data.sampler import MultiDatasetSampler
from simpletuner.data.types import DatasetIndex, ImageRecord


@dataclass
class Spec:
    """The DatasetSpec attributes the sampler reads."""

    id: str
    repeats: int = 0
    probability: float = 1.0
    ignore_epochs: bool = False
    is_regularisation_data: bool = False
    disabled: bool = False


def make_index(dataset_id, buckets):
    """buckets: {(width, height): image count}."""
    records = []
    for (width, height), count in buckets.items():
        for number in range(count):
            records.append(ImageRecord(dataset_id, f"{width}x{height}/{number}.png", ("caption",), (width, height),
                                       (width, height), (0, 0), (width, height)))
    return DatasetIndex(dataset_id, records, files_seen=len(records))


def make_sampler(datasets, batch_size=2, seed=7, rank=0, world_size=1, settings=None):
    """datasets: {id: (buckets, Spec kwargs)}."""
    indexes = {i: make_index(i, buckets) for i, (buckets, _) in datasets.items()}
    specs = {i: Spec(i, **kwargs) for i, (_, kwargs) in datasets.items()}
    return MultiDatasetSampler(indexes, specs, batch_size, seed, rank, world_size, settings)


def ids(batch):
    return [record.sample_id for record in batch]


TWO_DATASETS = {"a": ({(64, 64): 9, (96, 64): 7}, {}), "b": ({(64, 96): 6}, {"repeats": 1})}


def test_every_batch_is_one_bucket_of_one_dataset():
    sampler = make_sampler(TWO_DATASETS, batch_size=3)
    for _ in range(3 * sampler.steps_per_epoch):
        batch = sampler.next_batch()
        assert len(batch) == 3
        assert len({(r.dataset_id, r.bucket) for r in batch}) == 1


def test_order_depends_only_on_seed():
    first, second, other = (make_sampler(TWO_DATASETS, seed=s) for s in (7, 7, 8))
    run = [ids(first.next_batch()) for _ in range(30)]
    assert run == [ids(second.next_batch()) for _ in range(30)]
    assert run != [ids(other.next_batch()) for _ in range(30)]


def test_epochs_are_reshuffled():
    sampler = make_sampler(TWO_DATASETS)
    steps = sampler.steps_per_epoch
    first = [ids(sampler.next_batch()) for _ in range(steps)]
    assert sampler.epoch == 1 and sampler.epoch_finished
    second = [ids(sampler.next_batch()) for _ in range(steps)]
    assert sampler.epoch == 2
    assert first != second


def test_repeats_show_each_image_repeats_plus_one_times():
    sampler = make_sampler({"a": ({(64, 64): 8}, {"repeats": 2})}, batch_size=2)
    assert sampler.steps_per_epoch == 12
    seen = Counter(sample for _ in range(12) for sample in ids(sampler.next_batch()))
    assert set(seen.values()) == {3} and len(seen) == 8


def test_resume_from_state_continues_with_the_same_batches():
    datasets = dict(TWO_DATASETS, c=({(64, 64): 5}, {"ignore_epochs": True}))
    uninterrupted = make_sampler(datasets)
    for _ in range(uninterrupted.steps_per_epoch - 2):  # stop shortly before the epoch ends
        uninterrupted.next_batch()
    state = uninterrupted.state_dict()
    expected = [ids(uninterrupted.next_batch()) for _ in range(25)]

    resumed = make_sampler(datasets)
    resumed.load_state_dict(state)
    assert [ids(resumed.next_batch()) for _ in range(25)] == expected
    assert resumed.epoch == uninterrupted.epoch


def test_changed_layout_restarts_the_epoch(caplog):
    sampler = make_sampler(TWO_DATASETS)
    for _ in range(3):
        sampler.next_batch()
    state = sampler.state_dict()
    changed = make_sampler(TWO_DATASETS, batch_size=1)
    with caplog.at_level(logging.WARNING):
        changed.load_state_dict(state)
    assert changed.epoch_step == 0 and "restarting epoch 1" in caplog.text


def test_ranks_split_each_global_batch_without_overlap():
    ranks = [make_sampler(TWO_DATASETS, batch_size=2, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch
    everything = Counter()
    for _ in range(ranks[0].steps_per_epoch):
        left, right = (sampler.next_batch() for sampler in ranks)
        assert len(left) == len(right) == 2
        assert not set(ids(left)) & set(ids(right))
        assert len({(r.dataset_id, r.bucket) for r in left + right}) == 1
        everything.update(ids(left) + ids(right))
    # 9+7 images of "a" fill 2+1 global batches of 4; "b" (6 images, repeats 1) fills 3
    assert sum(everything.values()) == 4 * ranks[0].steps_per_epoch == 24


def test_small_buckets_are_pruned_unless_disabled(caplog):
    datasets = {"a": ({(64, 64): 8, (96, 64): 1}, {})}
    with caplog.at_level(logging.WARNING):
        pruned = make_sampler(datasets, batch_size=4)
    assert pruned.pruned == {"a": [("96x64", 1)]} and "96x64 (1 images)" in caplog.text
    assert all(r.bucket == "64x64" for _ in range(4) for r in pruned.next_batch())
    kept = make_sampler(datasets, batch_size=4, settings=Settings({"disable_bucket_pruning": True}))
    assert kept.steps_per_epoch == 3
    buckets = Counter(kept.next_batch()[0].bucket for _ in range(3))
    assert buckets == {"64x64": 2, "96x64": 1}


def test_too_small_datasets_explain_the_fix():
    with pytest.raises(ValueError, match=r"needs repeats >= 2") as caught:
        make_sampler({"a": ({(64, 64): 3}, {})}, batch_size=4, world_size=2)
    assert "train_batch_size=4 x 2 processes" in str(caught.value)


def test_oversubscription_raises_repeats():
    settings = Settings({"allow_dataset_oversubscription": True})
    sampler = make_sampler({"a": ({(64, 64): 25}, {})}, batch_size=4, world_size=8, settings=settings)
    assert sampler.repeats_raised == {"a": 1}
    assert sampler.steps_per_epoch == 1  # 50 samples -> one global batch of 32


def share_of_b(sampler, steps):
    return sum(sampler.next_batch()[0].dataset_id == "b" for _ in range(steps)) / steps


def test_auto_weighting_follows_dataset_size_and_uniform_follows_probability():
    sizes = {"a": ({(64, 64): 900}, {}), "b": ({(64, 64): 100}, {})}
    auto = make_sampler(sizes, batch_size=1, settings=Settings({"data_backend_sampling": "auto-weighting"}))
    assert 0.05 < share_of_b(auto, 400) < 0.16
    uniform = make_sampler(sizes, batch_size=1, settings=Settings({"data_backend_sampling": "uniform"}))
    assert 0.4 < share_of_b(uniform, 150) < 0.6
    weighted = {"a": ({(64, 64): 900}, {}), "b": ({(64, 64): 900}, {"probability": 3.0})}
    uniform = make_sampler(weighted, batch_size=1, settings=Settings({"data_backend_sampling": "uniform"}))
    assert 0.65 < share_of_b(uniform, 400) < 0.85


def test_ignore_epochs_dataset_does_not_decide_epoch_length():
    datasets = {"a": ({(64, 64): 10}, {}), "b": ({(64, 64): 200}, {"ignore_epochs": True})}
    sampler = make_sampler(datasets, batch_size=2)
    steps = sampler.steps_per_epoch
    drawn = Counter(sampler.next_batch()[0].dataset_id for _ in range(steps))
    assert drawn["a"] == 5 and drawn["b"] > 10
    assert sampler.epoch_finished
    sampler.next_batch()
    assert sampler.epoch == 2


def test_regularisation_flag_comes_from_the_dataset():
    sampler = make_sampler({"a": ({(64, 64): 4}, {}), "reg": ({(64, 64): 4}, {"is_regularisation_data": True})})
    batches = [sampler.next_batch() for _ in range(sampler.steps_per_epoch)]
    assert all(r.is_regularisation == (r.dataset_id == "reg") for batch in batches for r in batch)


def test_disabled_and_zero_probability_datasets_are_not_sampled():
    sampler = make_sampler({"a": ({(64, 64): 4}, {}), "off": ({(64, 64): 4}, {"disabled": True}),
                            "zero": ({(64, 64): 4}, {"probability": 0})})
    assert {sampler.next_batch()[0].dataset_id for _ in range(10)} == {"a"}
