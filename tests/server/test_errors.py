"""In-process tests of every rejection: 400 for malformed or invalid requests, 401 for keys, 413 for
bodies, 404/405 for routes. Each error has OpenAI's shape, a useful message, and reaches no engine."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from nvila.server import ServerLimits, create_app

from test_api import CHAT, png_data_url

LIMITS = ServerLimits(max_body_bytes=64 << 10, max_tokens=64, max_media=3, max_video_frames=16)
USER = {"role": "user", "content": "hi"}


def assert_error(r, status: int, *, message: str, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert message in err["message"], err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


@pytest.fixture
def client(fake_engine):
    with TestClient(create_app(fake_engine, limits=LIMITS)) as c:
        yield c


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def video(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


BAD_REQUESTS = {
    "no messages": ({"model": "m"}, "messages: Field required", "messages"),
    "empty messages": ({"messages": []}, "messages: List should have at least 1 item", "messages"),
    "unknown role": ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role: Input should be",
                     "messages[0].role"),
    "unknown part type": ({"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {}}]}]},
                          "'audio_url'", None),
    "part without url": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                         "messages[0].content[0].image_url.url: Field required",
                         "messages[0].content[0].image_url.url"),
    "unknown field": ({"messages": [USER], "logprobs": True}, "logprobs: Extra inputs are not permitted", "logprobs"),
    "negative max_tokens": ({"messages": [USER], "max_tokens": 0}, "max_tokens", "max_tokens"),
    "temperature too high": ({"messages": [USER], "temperature": 3}, "temperature", "temperature"),
    "n > 1": ({"messages": [USER], "n": 2}, "n=2 is not supported", "n"),
    "max_tokens over the cap": ({"messages": [USER], "max_tokens": 65}, "over this server's limit of 64", "max_tokens"),
    "max_completion_tokens over the cap": ({"messages": [USER], "max_completion_tokens": 1000}, "limit of 64",
                                           "max_completion_tokens"),
    "frames over the cap": ({"messages": [USER], "num_video_frames": 17}, "limit of 16", "num_video_frames"),
    "too many media": ({"messages": [{"role": "user", "content": [image(png_data_url())] * 4}]},
                       "4 media in one request is over the limit of 3", "messages"),
    "remote image without the flag": ({"messages": [{"role": "user", "content": [image("http://127.0.0.1:9/a.png")]}]},
                                      "--allow-remote-media", "messages[0].content[0]"),
    "remote video without the flag": ({"messages": [{"role": "user", "content": [video("https://x.test/a.mp4")]}]},
                                      "--allow-remote-media", "messages[0].content[0]"),
    "local path without the flag": ({"messages": [{"role": "user", "content": [image("/etc/hostname")]}]},
                                    "--allow-local-media", "messages[0].content[0]"),
    "file URL without the flag": ({"messages": [{"role": "user", "content": [video("file:///tmp/a.mp4")]}]},
                                  "--allow-local-media", None),
    "unsupported scheme": ({"messages": [{"role": "user", "content": [image("ftp://host/a.png")]}]},
                           "unsupported URL scheme 'ftp'", None),
    "video data URL with bad base64": ({"messages": [{"role": "user", "content": [
        video("data:video/mp4;base64,@@@")]}]}, "not valid base64", "messages[0].content[0]"),
    "video data URL of an image": ({"messages": [{"role": "user", "content": [video(png_data_url())]}]},
                                   "is not video/*", None),
    "corrupt base64 image": ({"messages": [{"role": "user", "content": [image("data:image/png;base64,%%%%")]}]},
                             "bad data URL (payload is not valid base64)", "messages"),
    "user message without content": ({"messages": [{"role": "user", "content": None}]},
                                     "messages[0]: Value error, content is required in user messages", "messages[0]"),
    "undecodable video, named by its param": ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}, video("data:video/mp4;base64," + base64.b64encode(b"garbage").decode())]}]},
        "messages[0].content[1] (data URL): not a video file", "messages"),
    "undecodable image": ({"messages": [{"role": "user", "content": [
        image("data:image/png;base64," + base64.b64encode(b"not a png at all").decode())]}]},
        "not an image in a supported format", "messages"),
}


@pytest.mark.parametrize("body, message, param", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_get_400_with_a_message(client, fake_engine, body, message, param):
    assert_error(client.post(CHAT, json=body), 400, message=message, param=param)
    assert not fake_engine.handles  # nothing was queued
    assert client.get("/health").status_code == 200  # and the server is still up


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"text"'])
def test_malformed_json_is_400_not_422(client, raw):
    err = assert_error(client.post(CHAT, content=raw, headers={"content-type": "application/json"}), 400,
                       message="JSON", code="invalid_json")
    assert err["type"] == "invalid_request_error"


def test_body_over_the_limit_is_413_by_content_length(client, fake_engine):
    big = {"messages": [{"role": "user", "content": "x" * (65 << 10)}]}
    assert_error(client.post(CHAT, json=big), 413, message="larger than the limit of 65536 bytes",
                 code="request_too_large")
    assert not fake_engine.handles


def test_body_over_the_limit_is_413_when_streamed_without_length(client, fake_engine):
    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}]}'

    r = client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, message="larger than the limit", code="request_too_large")
    assert not fake_engine.handles


def test_api_key_is_required_on_v1_routes(fake_engine):
    with TestClient(create_app(fake_engine, api_key="s3cret")) as c:
        body = {"messages": [USER]}
        err = assert_error(c.post(CHAT, json=body), 401, message="missing API key", code="missing_api_key")
        assert err["type"] == "authentication_error"
        assert_error(c.post(CHAT, json=body, headers={"Authorization": "Bearer wrong"}), 401,
                     message="incorrect API key", code="invalid_api_key")
        assert_error(c.post(CHAT, json=body, headers={"Authorization": "Basic s3cret"}), 401, message="missing API key")
        assert_error(c.get("/v1/models"), 401, message="missing API key")
        assert not fake_engine.handles
        ok = c.post(CHAT, json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "You said: hi"
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200  # health checks need no key
        assert c.get("/").status_code == 200  # nor the page (it asks for the key)


def test_unknown_routes_and_methods_use_the_error_shape(client):
    assert_error(client.get("/v1/completions"), 404, message="Not Found", code="not_found")
    assert_error(client.get(CHAT), 405, message="Method Not Allowed")


def test_engine_rejections_become_400_and_shutdown_503(client, fake_engine):
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "TOO LONG"}]})
    assert_error(r, 400, message="the context holds 4096", param="messages")
    fake_engine.shut_down = True
    assert_error(client.post(CHAT, json={"messages": [USER]}), 503, message="the engine is shut down",
                 code="engine_unavailable")
