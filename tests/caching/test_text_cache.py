import pytest
import torch

from simpletuner.caching.store import CacheEntryMissing, TensorStore
from simpletuner.caching.text import REASON_MISSING, REASON_MODEL, REASON_NEW_CAPTION, TextEmbedCache
from simpletuner.data.storage.local import LocalStorage


class FakeTextEncoder:
    """Stands in for family.encode_text: embeds from character codes, plus a pooled vector."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        embeds = torch.zeros(len(prompts), 8, 4)
        for row, prompt in enumerate(prompts):
            for position, char in enumerate(prompt[:8]):
                embeds[row, position] = ord(char)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": embeds.mean(dim=1)}


def make_cache(tmp_path, fingerprint="te-a"):
    return TextEmbedCache(TensorStore(LocalStorage(str(tmp_path / "text"))), fingerprint)


def test_build_encodes_unique_captions_plus_empty_once(tmp_path):
    cache, encoder = make_cache(tmp_path), FakeTextEncoder()
    captions = ["a cat", "a dog", "a cat", "a bird"]
    assert cache.build(captions, encoder, batch_size=2, progress=False) == 4  # 3 distinct + ""
    assert sorted(p for call in encoder.calls for p in call) == ["", "a bird", "a cat", "a dog"]
    assert all(len(call) <= 2 for call in encoder.calls)
    cat = cache.get("a cat")
    assert cat["prompt_embeds"].shape == (8, 4) and cat["pooled_prompt_embeds"].shape == (4,)
    assert cat["prompt_embeds"][0, 0] == ord("a")
    assert torch.count_nonzero(cache.get("")["prompt_embeds"]) == 0

    second = FakeTextEncoder()
    assert make_cache(tmp_path).build(captions, second, batch_size=2, progress=False) == 0
    assert second.calls == []


def test_plan_reasons(tmp_path):
    cache = make_cache(tmp_path)
    plan = cache.plan(["hello"])
    assert plan.reasons() == {REASON_NEW_CAPTION: 2}  # "hello" and ""
    cache.build(["hello"], FakeTextEncoder(), batch_size=8, progress=False)
    assert make_cache(tmp_path, fingerprint="te-b").plan(["hello", "new"]).reasons() == {
        REASON_MODEL: 2, REASON_NEW_CAPTION: 1}
    cache.store.delete(cache.key_for("hello"))
    plan = make_cache(tmp_path).plan(["hello"])
    assert plan.to_encode == [("hello", REASON_MISSING)] and plan.cached == [""]
    assert "1 cached, 1 to encode (cache entry missing: 1)" == plan.summary()


def test_put_and_missing_caption(tmp_path):
    cache = make_cache(tmp_path)
    cache.put("validation prompt", {"prompt_embeds": torch.ones(8, 4)})
    cache.flush()
    assert torch.equal(make_cache(tmp_path).get("validation prompt")["prompt_embeds"], torch.ones(8, 4))
    with pytest.raises(CacheEntryMissing):
        cache.get("never encoded")


def test_encoder_batch_mismatch_is_an_error(tmp_path):
    def broken(prompts):
        return {"prompt_embeds": torch.zeros(1, 8, 4)}

    with pytest.raises(RuntimeError, match="batch size 1 for 2 prompts"):
        make_cache(tmp_path).build(["x", "y"], broken, batch_size=2, progress=False)
