"""Prefix caching: reused KV gives the ids of a full prefill; keys tell media apart; the store is bounded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nvila import NVILAForConditionalGeneration, NVILAProcessor
from nvila.engine import Engine, EngineConfig, GenerationRequest
from nvila.engine.prefix import PrefixCache, common_prefix, media_positions, prompt_key

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pair(tiny_checkpoints):
    """The same checkpoint in two engines: with the prefix cache and without."""
    path = tiny_checkpoints["nvila"]
    model, processor = NVILAForConditionalGeneration.from_pretrained(path), NVILAProcessor.from_pretrained(path)
    cached = Engine(model, processor, EngineConfig(max_batch_size=2, max_seq_len=4096))
    plain = Engine(model, processor, EngineConfig(max_batch_size=2, max_seq_len=4096, prefix_cache_mib=0))
    yield cached, plain
    cached.shutdown()
    plain.shutdown()


def _run(engine, messages, n=6):
    handle = engine.submit(GenerationRequest(messages=messages, max_tokens=n))
    text = handle.text()
    return handle, text


def _chat(image, questions, engine, plain):
    """Ask ``questions`` in turn about ``image``; each turn's ids must equal the uncached engine's."""
    messages, handles = [], []
    for q in questions:
        content = [{"type": "image", "image": image}, {"type": "text", "text": q}] if not messages else q
        messages.append({"role": "user", "content": content})
        got, text = _run(engine, messages)
        want, _ = _run(plain, messages)
        assert got.token_ids == want.token_ids
        assert want.metrics.cached_tokens == 0
        handles.append(got)
        messages.append({"role": "assistant", "content": text})
    return handles


def test_follow_up_turns_reuse_the_prefix_and_give_the_same_ids(pair):
    engine, plain = pair
    before = engine.stats()["prefix_cache"]["hits"]
    first, second, third = _chat(IMAGE, ["What is this?", "And the colours?", "Anything else?"], engine, plain)
    assert first.metrics.cached_tokens == 0
    # the follow-ups reuse at least the first prompt, image included, and prefill only the rest
    assert second.metrics.cached_tokens >= first.metrics.prompt_tokens
    assert third.metrics.cached_tokens >= second.metrics.prompt_tokens
    assert third.metrics.cached_tokens < third.metrics.prompt_tokens
    assert engine.stats()["prefix_cache"]["hits"] == before + 2


def test_another_image_is_not_reused_past_the_text_before_it(pair):
    engine, plain = pair
    q = "Describe the picture."
    _run(engine, [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": q}]}])
    other = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (420, 300), (10, 200, 30))},
                                          {"type": "text", "text": q}]}]
    got, _ = _run(engine, other)
    want, _ = _run(plain, other)
    assert got.token_ids == want.token_ids
    ids = engine.processor.prepare([other])[0]["input_ids"][0]
    first_image = int(torch.nonzero(ids == engine.model.ids.image)[0, 0])
    assert got.metrics.cached_tokens <= first_image


def test_the_same_prompt_again_prefills_one_token(pair):
    engine, plain = pair
    messages = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "Again?"}]}]
    a, _ = _run(engine, messages)
    b, _ = _run(engine, messages)
    assert b.metrics.cached_tokens == b.metrics.prompt_tokens - 1
    assert a.token_ids == b.token_ids == _run(plain, messages)[0].token_ids


def test_prompt_key_marks_each_medium_by_its_digest():
    ids = torch.tensor([5, 9, 9, 9, 6, 9, 9, 7, 8, 8])  # image id 9, video id 8
    at = media_positions(ids, [(9, 3), (9, 2), (8, 2)])
    assert [p.tolist() for p in at] == [[1, 2, 3], [5, 6], [8, 9]]
    key = prompt_key(ids, at, ["a" * 40, "b" * 40, "c" * 40])
    assert key[[0, 4, 7]].tolist() == [5, 6, 7]
    assert len(set(key[1:4])) == 1 and len(set(key[5:7])) == 1 and key[1] != key[5] != key[8]
    assert (key[[1, 5, 8]] < 0).all()
    same = prompt_key(ids, at, ["a" * 40, "b" * 40, "c" * 40])
    assert common_prefix(key, same) == len(ids)
    other = prompt_key(ids, at, ["a" * 40, "d" * 40, "c" * 40])
    assert common_prefix(key, other) == 5


def test_the_store_is_bounded_least_recently_used_first():
    def kv(n):
        return torch.zeros(2, 1, n, 4), torch.zeros(2, 1, n, 4)  # 64 bytes per position (k and v)

    cache = PrefixCache(capacity_bytes=64 * 10)
    cache.insert(np.arange(4), *kv(4))
    cache.insert(np.arange(10, 14), *kv(4))
    assert cache.longest(np.arange(3), limit=100)[0] == 3  # touches the first entry
    cache.insert(np.arange(20, 24), *kv(4))  # over capacity: the least recently used (second) goes
    assert cache.stats()["entries"] == 2 and cache.bytes <= cache.capacity
    assert cache.longest(np.arange(10, 14), limit=100)[0] == 0
    assert cache.longest(np.arange(4), limit=2)[0] == 2  # never more than the limit
    cache.insert(np.arange(6), *kv(6))  # covers arange(4): that entry is dropped
    assert cache.stats()["entries"] == 2 and cache.stats()["tokens"] == 10
    cache.insert(np.arange(30, 50), *kv(20))  # larger than the whole store: not kept
    assert cache.stats()["tokens"] == 10
    assert cache.stats()["hits"] == 2
