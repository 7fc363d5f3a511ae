"""Engine correctness: golden greedy ids, batch == alone, cached == uncached, streaming semantics."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from nvila_testing import GOLDEN, golden_case
from nvila import NVILAForConditionalGeneration, NVILAProcessor
from nvila.engine import Engine, EngineConfig, GenerationRequest

IMAGE = str(GOLDEN / "inputs" / "image_1000x700.png")


def _msgs(case):
    out = []
    for m in case["messages"]:
        parts = [dict(p, **({p["type"]: str(GOLDEN / "inputs" / p[p["type"]])} if p["type"] in ("image", "video") else {}))
                 for p in m["content"]]
        out.append({"role": m["role"], "content": parts})
    return out


@pytest.fixture(scope="module")
def engines(tiny_checkpoints):
    made = {}

    def get(variant, **cfg):
        key = (variant, tuple(sorted(cfg.items())))
        if key not in made:
            path = tiny_checkpoints[variant]
            made[key] = Engine(NVILAForConditionalGeneration.from_pretrained(path), NVILAProcessor.from_pretrained(path),
                               EngineConfig(**cfg))
        return made[key]

    yield get
    for e in made.values():
        e.shutdown()


@pytest.mark.parametrize("name", ["nvila__text", "nvila__image", "nvila-lite__image", "nvila-video__video"])
def test_engine_greedy_matches_golden(name, engines):
    case, _ = golden_case(name)
    engine = engines(case["variant"], max_batch_size=4)
    handle = engine.submit(GenerationRequest(messages=_msgs(case), max_tokens=case["max_new_tokens"]))
    text = handle.text()
    assert handle.token_ids == case["generated_ids"]
    assert text.strip() == case["generated_text"]
    assert handle.finish_reason == "length"
    m = handle.metrics
    assert m.prompt_tokens == case["seq_len"] and m.completion_tokens == 8
    assert [i.num_tokens for i in handle.media] == case["embed_lengths"]
    assert m.visual_tokens == [i.num_visual_tokens for i in handle.media]
    assert all(v < n for v, n in zip(m.visual_tokens, case["embed_lengths"]))  # "\n" rows are not visual
    assert m.ttft_s > 0 and m.prefill_tokens_per_s > 0


def _requests():
    red = Image.new("RGB", (320, 200), (220, 20, 20))
    return [
        [{"role": "user", "content": "Write a haiku about mountains in winter."}],
        [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "Describe it."}]}],
        [{"role": "user", "content": [{"type": "image", "image": red}, {"type": "text", "text": "Colour?"}]}],
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
    ]


def _alone_then_together(engine: Engine) -> list:
    """Runs ``_requests()`` one at a time, then all submitted together; asserts that each request
    of the batch gets the ids it got alone and returns the batch's handles."""
    alone = []
    for msgs in _requests():
        h = engine.submit(GenerationRequest(messages=msgs, max_tokens=12))
        h.text()
        alone.append(h.token_ids)
    handles = [engine.submit(GenerationRequest(messages=msgs, max_tokens=12)) for msgs in _requests()]
    for h in handles:
        h.text()
    assert [h.token_ids for h in handles] == alone
    return handles


@pytest.mark.parametrize("prefix_cache_mib", [0, 512])
def test_each_request_in_a_batch_gets_what_it_gets_alone(engines, prefix_cache_mib):
    engine = engines("nvila", max_batch_size=8, prefix_cache_mib=prefix_cache_mib)
    handles = _alone_then_together(engine)
    if prefix_cache_mib:  # the second round reuses each prompt's KV: one position is prefilled
        assert all(h.metrics.cached_tokens == h.metrics.prompt_tokens - 1 for h in handles)
    else:
        assert sum(h.metrics.cached_media for h in handles) == 2  # both images were encoded in the first round


def test_batch_equals_alone_in_bfloat16_on_the_cpu(tiny_checkpoints):
    """In bf16 the CPU's tower runs torch's SDPA (float32 keeps the chunked eager math): each request
    of a batch still gets what it gets alone, its images encoded again in the batch (no cache)."""
    path = tiny_checkpoints["nvila"]
    model = NVILAForConditionalGeneration.from_pretrained(path, torch_dtype=torch.bfloat16)
    engine = Engine(model, NVILAProcessor.from_pretrained(path),
                    EngineConfig(max_batch_size=8, vision_cache_size=0, prefix_cache_mib=0))
    try:
        assert sum(h.metrics.cached_media for h in _alone_then_together(engine)) == 0
    finally:
        engine.shutdown()


def test_requests_join_a_running_batch(engines):
    engine = engines("nvila-lite", max_batch_size=2)
    msgs = _requests()
    solo = engine.submit(GenerationRequest(messages=msgs[0], max_tokens=20))
    solo.text()
    first = engine.submit(GenerationRequest(messages=msgs[0], max_tokens=20))
    it = iter(first)
    next(it)  # first is decoding; the next two join while it runs, and one must wait for a free slot
    second = engine.submit(GenerationRequest(messages=msgs[3], max_tokens=5))
    third = engine.submit(GenerationRequest(messages=msgs[4], max_tokens=5))
    list(it)
    second.text(), third.text()
    assert first.token_ids == solo.token_ids
    for h, m in ((second, msgs[3]), (third, msgs[4])):
        ref = engine.submit(GenerationRequest(messages=m, max_tokens=5))
        ref.text()
        assert h.token_ids == ref.token_ids


def test_cached_decode_equals_uncached_forward(tiny_checkpoints):
    path = tiny_checkpoints["nvila"]
    model, processor = NVILAForConditionalGeneration.from_pretrained(path), NVILAProcessor.from_pretrained(path)
    engine = Engine(model, processor, EngineConfig(max_batch_size=2, max_seq_len=4096))
    try:
        msgs = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "x"}]}]
        inputs = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=5)
        n = inputs["input_ids"].shape[1]
        full = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            ref = model(**full).logits[0]
            runner = engine.runner
            first = runner.prefill(1, model.embed(inputs["input_ids"], inputs["pixel_values"], inputs["image_block_sizes"]))
            assert (first - ref[n - 1]).abs().max().item() <= 1e-4
            runner.cache.move(1, 0, n)
            for step in range(ids.shape[1] - n - 1):
                pos = n + step
                logits = runner.decode(ids[0, pos:pos + 1], [pos])
                assert (logits[0] - ref[pos]).abs().max().item() <= 1e-4
    finally:
        engine.shutdown()


def test_stop_strings_max_tokens_and_seeded_sampling(engines):
    engine = engines("nvila-lite", max_batch_size=4)
    msgs = _requests()[0]
    h = engine.submit(GenerationRequest(messages=msgs, max_tokens=30))
    full = h.text()
    assert len(h.token_ids) == 30 and h.finish_reason == "length"
    cut = full[5:9]
    assert cut and cut in full
    s = engine.submit(GenerationRequest(messages=msgs, max_tokens=30, stop=[cut]))
    text = s.text()
    assert s.finish_reason == "stop" and text == full[:full.index(cut)]
    kw = dict(messages=msgs, max_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, top_k=50)
    a, b, c = (engine.submit(GenerationRequest(seed=seed, **kw)) for seed in (7, 7, 8))
    for h in (a, b, c):
        h.text()
    assert a.token_ids == b.token_ids != c.token_ids


def test_cancel_and_bad_input(engines):
    engine = engines("nvila-lite", max_batch_size=1)
    msgs = _requests()[0]
    long = engine.submit(GenerationRequest(messages=msgs, max_tokens=500))
    waiting = engine.submit(GenerationRequest(messages=msgs, max_tokens=5))
    next(iter(long))
    long.cancel()
    assert list(long)[-1].finish_reason == "abort"
    assert waiting.text() is not None and waiting.finish_reason == "length"
    from nvila.media import MediaError

    with pytest.raises(MediaError):
        engine.submit(GenerationRequest(messages=[{"role": "user", "content": [{"type": "image", "image": b"junk"}]}]))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit(GenerationRequest(messages=msgs, max_tokens=0))


def test_shutdown_aborts_everything(tiny_checkpoints):
    path = tiny_checkpoints["nvila-lite"]
    engine = Engine(NVILAForConditionalGeneration.from_pretrained(path), NVILAProcessor.from_pretrained(path),
                    EngineConfig(max_batch_size=1))
    handles = [engine.submit(GenerationRequest(messages=_requests()[0], max_tokens=2000)) for _ in range(3)]
    done = threading.Event()
    threading.Timer(0.5, lambda: (engine.shutdown(), done.set())).start()
    reasons = [list(h)[-1].finish_reason for h in handles]
    done.wait(10)
    assert set(reasons) <= {"abort", "length"} and "abort" in reasons
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit(GenerationRequest(messages=_requests()[0]))


def test_one_prefill_at_most_between_decode_steps(tiny_checkpoints):
    """While streams decode, new requests are admitted one per scheduler iteration: a decode step runs
    between any two admissions, so media encoding stalls running streams for at most one prefill."""
    path = tiny_checkpoints["nvila"]
    engine = Engine(NVILAForConditionalGeneration.from_pretrained(path), NVILAProcessor.from_pretrained(path),
                    EngineConfig(max_batch_size=8))
    trace: list[str] = []
    admit, step = engine._admit, engine._step
    engine._admit = lambda r: (trace.append("admit"), admit(r))[1]
    engine._step = lambda: (trace.append("step"), step())[1]
    try:
        running = engine.submit(GenerationRequest(messages=_requests()[0], max_tokens=200, ignore_eos=True))
        next(iter(running))
        img = lambda c: [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (300, 300), c)},  # noqa: E731
                                                      {"type": "text", "text": "Colour?"}]}]
        joiners = [engine.submit(GenerationRequest(messages=img(c), max_tokens=3, ignore_eos=True))
                   for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
        for h in joiners:
            h.text()
        running.cancel()
        running.text()
    finally:
        engine.shutdown()
    admissions = [i for i, t in enumerate(trace) if t == "admit"]
    assert len(admissions) == 4
    for a, b in zip(admissions[1:], admissions[2:]):
        assert "step" in trace[a:b], trace
