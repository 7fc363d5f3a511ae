"""In-process tests of the OpenAI-compatible API against the fake engine: schema, sampling
parameters, streaming chunk format, usage, models, health and the demo page."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from nvila.server import ServerLimits, create_app

CHAT = "/v1/chat/completions"


def png_data_url(size=(12, 9), color=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def sse_events(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, checking the framing on the way."""
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


@pytest.fixture
def client(fake_engine):
    with TestClient(create_app(fake_engine, limits=ServerLimits(max_tokens=64, max_video_frames=16))) as c:
        yield c


def test_chat_completion_has_the_openai_shape_and_usage(client, fake_engine):
    r = client.post(CHAT, json={"model": "anything", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url((12, 9))}},
                                     {"type": "text", "text": "what is this"}]}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "fake-nvila"  # the served model, whatever the request named
    assert isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "You said: what is this"},
                                "finish_reason": "stop", "logprobs": None}]
    # the fake reports width % 7 visual tokens for an image and 10 + media tokens for the prompt
    assert body["usage"] == {"prompt_tokens": 10 + 2 + 5, "completion_tokens": 5, "total_tokens": 22,
                             "prompt_tokens_details": {"cached_tokens": 0}, "visual_tokens": [5]}


def test_messages_reach_the_engine_in_the_processor_format(client, fake_engine):
    url = png_data_url()
    r = client.post(CHAT, json={"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "and"},
                                     {"type": "image_url", "image_url": {"url": url}}]},
    ]})
    assert r.status_code == 200, r.text
    assert fake_engine.requests[0].messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "and"}, {"type": "image", "image": url}]},
    ]


@pytest.mark.parametrize("params, expected", [
    ({}, dict(max_tokens=64, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, seed=None, stop=[], options={})),
    ({"temperature": 0, "max_tokens": 7, "stop": "END", "seed": 3},
     dict(max_tokens=7, do_sample=False, temperature=1.0, stop=["END"], seed=3)),
    ({"temperature": 0.7, "top_p": 0.9, "top_k": 5, "repetition_penalty": 1.1, "max_completion_tokens": 9,
      "stop": ["a", "b"], "num_video_frames": 16},
     dict(max_tokens=9, do_sample=True, temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.1, stop=["a", "b"],
          options={"num_video_frames": 16})),
    ({"media_io_kwargs": {"video": {"num_frames": 12}}}, dict(options={"num_video_frames": 12})),  # vLLM's spelling
    ({"media_io_kwargs": {"video": {"num_frames": 12}}, "num_video_frames": 12}, dict(options={"num_video_frames": 12})),
])
def test_sampling_parameters_map_onto_the_generation_request(client, fake_engine, params, expected):
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "x"}], **params})
    assert r.status_code == 200, r.text
    got = fake_engine.requests[0]
    assert {k: getattr(got, k) for k in expected} == expected


def test_max_tokens_and_stop_set_the_finish_reason(client):
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "one two three four"}], "max_tokens": 2})
    assert r.json()["choices"][0]["message"]["content"] == "You said:"
    assert r.json()["choices"][0]["finish_reason"] == "length"
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "one two three four"}], "stop": [" three"]})
    assert r.json()["choices"][0]["message"]["content"] == "You said: one two"
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_stream_chunks_follow_openai(client):
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "stream me"}], "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["model"] for c in chunks} == {"fake-nvila"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "You said: stream me"
    assert len(chunks) == 2 + 4  # role, one chunk per word, finish
    assert all(c.get("usage") is None for c in chunks)


def test_stream_usage_chunk_when_asked(client):
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url((10, 4))}}, {"type": "text", "text": "hi"}]}],
        "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 2})
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 10 + 2 + 3, "completion_tokens": 2, "total_tokens": 17,
                                   "prompt_tokens_details": {"cached_tokens": 0}, "visual_tokens": [3]}


def test_engine_error_ends_the_stream_with_an_error_event(fake_engine):
    fake_engine.fail_with = "out of cache"
    with TestClient(create_app(fake_engine)) as c:
        r = c.post(CHAT, json={"messages": [{"role": "user", "content": "x"}], "stream": True})
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        assert json.loads(events[1])["choices"][0]["delta"] == {"content": "Partial"}
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "out of cache" in error["message"]
        r = c.post(CHAT, json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 500
        assert "out of cache" in r.json()["error"]["message"]


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["context_length"]) for m in models["data"]] == [("fake-nvila", "model", 4096)]
    assert client.get("/health").json() == {"status": "ok", "model": "fake-nvila"}


def test_demo_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for hook in ('id="file"', 'id="prompt"', 'id="send"', "/v1/chat/completions", "getReader"):
        assert hook in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "the page must not load anything from outside"
