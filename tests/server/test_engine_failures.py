"""In-process tests of the app around the real engine (tiny NVILA-Lite, two slots): a failure inside
an engine step fails only its request (500, or an error event then ``[DONE]``), a concurrent request
finishes with its full answer, and later requests are served; the two reported hostile requests
(seed 2**64, a body nested 5,000 deep) are 400s and leave the server answering."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from nvila.engine import Engine, EngineConfig
from nvila.server import ServerLimits, create_app

from test_api import CHAT, sse_events
from test_errors import assert_error

BYSTANDER = {"messages": [{"role": "user", "content": "Write a haiku about mountains in winter."}], "max_tokens": 12,
             "temperature": 0}
VICTIM = {"messages": [{"role": "user", "content": "VICTIM: why is the sky blue?"}], "max_tokens": 12,
          "temperature": 0}


@pytest.fixture
def engine(tiny_lite):
    e = Engine.from_pretrained(tiny_lite, config=EngineConfig(max_batch_size=2))
    yield e
    e.shutdown()


async def _post(app, *bodies: dict) -> list[httpx.Response]:
    """Send the bodies concurrently and return the responses, in order."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
        return await asyncio.gather(*(c.post(CHAT, json=b) for b in bodies))


def _post_one(app, body: dict) -> httpx.Response:
    return asyncio.run(_post(app, body))[0]


@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_engine_step_fails_only_its_request(engine, monkeypatch, stream):
    app = create_app(engine, limits=ServerLimits(max_tokens=64))
    alone = _post_one(app, BYSTANDER).json()["choices"][0]
    assert alone["finish_reason"] == "length"  # runs all 12 tokens: it is still decoding when the victim fails

    # Decoding waits until both requests are in the engine, so that they share decode steps; the
    # victim then fails while recording its 4th token.
    both_in, submitted, running_at_failure = threading.Event(), [], []
    submit, step, accept = engine.submit, engine._step, engine._accept

    def submit_and_count(request):
        handle = submit(request)
        submitted.append(handle)
        if len(submitted) == 2:
            both_in.set()
        return handle

    def failing_accept(r, token):
        if "VICTIM" in str(r.request.messages) and r.new_tokens == 3:
            running_at_failure.append(engine.stats()["running"])
            raise RuntimeError("injected failure")
        accept(r, token)

    monkeypatch.setattr(engine, "submit", submit_and_count)
    monkeypatch.setattr(engine, "_step", lambda: (both_in.wait(60), step())[1])
    monkeypatch.setattr(engine, "_accept", failing_accept)
    bystander, victim = asyncio.run(_post(app, BYSTANDER, dict(VICTIM, stream=stream)))

    assert running_at_failure == [2]
    assert bystander.status_code == 200 and bystander.json()["choices"][0] == alone
    if stream:
        assert victim.status_code == 200  # the failure came after the headers
        events = sse_events(victim.text)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-2]]
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and error["code"] == "generation_error"
        assert error["message"] == "generation failed: RuntimeError: injected failure"
    else:
        err = assert_error(victim, 500, message="generation failed: RuntimeError: injected failure",
                           code="generation_error")
        assert err["type"] == "server_error"
    later = _post_one(app, BYSTANDER)
    assert later.status_code == 200 and later.json()["choices"][0] == alone
    stats = engine.stats()
    assert (stats["running"], stats["waiting"], stats["kv_tokens"]) == (0, 0, 0)


def test_a_seed_of_2_to_the_64_is_400_and_the_server_answers_the_next_request(engine):
    app = create_app(engine)
    r = _post_one(app, dict(BYSTANDER, seed=2**64, temperature=1))
    assert_error(r, 400, message="seed: Input should be less than 9223372036854775808", param="seed")
    seeded = [_post_one(app, dict(BYSTANDER, seed=seed, temperature=1)) for seed in (2**63 - 1, -2**63, 2**63 - 1)]
    assert [r.status_code for r in seeded] == [200] * 3
    texts = [r.json()["choices"][0]["message"]["content"] for r in seeded]
    assert texts[0] == texts[2]  # the same seed samples the same answer


def test_a_body_nested_5000_deep_is_400_and_the_server_answers_the_next_request(engine):
    app = create_app(engine)

    async def deep():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post(CHAT, content=b"[" * 5000 + b"]" * 5000, headers={"content-type": "application/json"})

    assert_error(asyncio.run(deep()), 400, message="the request body nests arrays and objects 5000 deep; the limit "
                                                   "is 64", code="invalid_json")
    assert _post_one(app, BYSTANDER).status_code == 200
