"""In-process tests of every rejection: 400 for malformed, too deeply nested or invalid requests
(out-of-range numbers included), 401 for keys, 413 for bodies, 404/405 for routes. Each error has
OpenAI's shape, a useful message, and reaches no engine; the server answers the next request."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from nvila.server import ServerLimits, app as app_module, create_app

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
    "unknown field": ({"messages": [USER], "logit_bias": {}}, "logit_bias: Extra inputs are not permitted", "logit_bias"),
    "top_logprobs over OpenAI's 20": ({"messages": [USER], "logprobs": True, "top_logprobs": 21},
                                      "top_logprobs: Input should be less than or equal to 20", "top_logprobs"),
    "top_logprobs without logprobs": ({"messages": [USER], "top_logprobs": 2}, "top_logprobs needs logprobs: true",
                                      "top_logprobs"),
    "unsupported response_format": ({"messages": [USER], "response_format": {"type": "xml"}},
                                    "response_format: Input tag 'xml' found using 'type' does not match",
                                    "response_format"),
    "json_schema without a schema": ({"messages": [USER], "response_format": {"type": "json_schema", "json_schema": {
        "name": "x"}}}, "response_format.json_schema.schema: Field required", "response_format.json_schema.schema"),
    "negative max_tokens": ({"messages": [USER], "max_tokens": 0}, "max_tokens", "max_tokens"),
    "temperature too high": ({"messages": [USER], "temperature": 3}, "temperature", "temperature"),
    "n > 1": ({"messages": [USER], "n": 2}, "n=2 is not supported", "n"),
    "max_tokens over the cap": ({"messages": [USER], "max_tokens": 65}, "over this server's limit of 64", "max_tokens"),
    "max_completion_tokens over the cap": ({"messages": [USER], "max_completion_tokens": 1000}, "limit of 64",
                                           "max_completion_tokens"),
    "frames over the cap": ({"messages": [USER], "num_video_frames": 17}, "limit of 16", "num_video_frames"),
    "seed of 2**64": ({"messages": [USER], "seed": 2**64}, "seed: Input should be less than 9223372036854775808",
                      "seed"),
    "seed under -2**63": ({"messages": [USER], "seed": -2**63 - 1}, "greater than or equal to -9223372036854775808",
                          "seed"),
    "fractional seed": ({"messages": [USER], "seed": 1.5}, "valid integer", "seed"),
    "negative temperature": ({"messages": [USER], "temperature": -0.1}, "greater than or equal to 0", "temperature"),
    "NaN temperature": ({"messages": [USER], "temperature": float("nan")}, "finite number", "temperature"),
    "top_p of 0": ({"messages": [USER], "top_p": 0}, "greater than 0", "top_p"),
    "top_p over 1": ({"messages": [USER], "top_p": 1.5}, "less than or equal to 1", "top_p"),
    "negative top_k": ({"messages": [USER], "top_k": -1}, "greater than or equal to 0", "top_k"),
    "repetition_penalty of 0": ({"messages": [USER], "repetition_penalty": 0}, "greater than or equal to 0.01",
                                "repetition_penalty"),
    "infinite repetition_penalty": ({"messages": [USER], "repetition_penalty": float("inf")}, "finite number",
                                    "repetition_penalty"),
    "repetition_penalty over 100": ({"messages": [USER], "repetition_penalty": 101}, "less than or equal to 100",
                                    "repetition_penalty"),
    "n of 0": ({"messages": [USER], "n": 0}, "greater than or equal to 1", "n"),
    "n over OpenAI's 128": ({"messages": [USER], "n": 129}, "less than or equal to 128", "n"),
    "five stop sequences": ({"messages": [USER], "stop": ["a", "b", "c", "d", "e"]},
                            "at most 4 stop sequences are allowed, got 5", "stop"),
    "a long stop sequence": ({"messages": [USER], "stop": ["a", "x" * 257]},
                             "a stop sequence has at most 256 characters, got one of 257", "stop"),
    "a long stop string": ({"messages": [USER], "stop": "x" * 257}, "at most 256 characters", "stop"),
    "a nested stop list": ({"messages": [USER], "stop": [["a"]]}, "stop[0]: Input should be a valid string",
                           "stop[0]"),
    "zero video frames": ({"messages": [USER], "num_video_frames": 0}, "greater than or equal to 1",
                          "num_video_frames"),
    "media_io_kwargs frames over the cap": ({"messages": [USER], "media_io_kwargs": {"video": {"num_frames": 17}}},
                                            "num_video_frames=17 is over this server's limit of 16", "num_video_frames"),
    "two frame counts": ({"messages": [USER], "num_video_frames": 8, "media_io_kwargs": {"video": {"num_frames": 9}}},
                         "num_video_frames=8 and media_io_kwargs.video.num_frames=9 disagree", None),
    "media_io_kwargs for images": ({"messages": [USER], "media_io_kwargs": {"image": {"size": 3}}},
                                   "Extra inputs are not permitted", "media_io_kwargs.image"),
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
    raw = json.dumps(body).encode()  # NaN and Infinity as Python's json writes them (httpx refuses to)
    assert_error(client.post(CHAT, content=raw, headers={"content-type": "application/json"}), 400, message=message,
                 param=param)
    assert not fake_engine.handles  # nothing was queued
    r = client.post(CHAT, json={"messages": [USER]})  # and the server answers the next request
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "You said: hi"


def test_in_range_edge_values_are_accepted(client, fake_engine):
    r = client.post(CHAT, json={"messages": [USER], "seed": -2**63, "temperature": 2, "top_p": 1e-9, "top_k": 10**30,
                                "repetition_penalty": 0.01, "n": 1, "stop": ["a", "b", "c", "x" * 256],
                                "max_tokens": 64})
    assert r.status_code == 200, r.text
    r = client.post(CHAT, json={"messages": [USER], "seed": 2**63 - 1, "temperature": 1e-6, "repetition_penalty": 100})
    assert r.status_code == 200, r.text
    first, second = fake_engine.requests
    assert (first.seed, first.do_sample, first.temperature) == (-2**63, True, 2.0)
    assert (second.seed, second.do_sample) == (2**63 - 1, False)  # under 1e-5: greedy, as vLLM


def test_max_tokens_must_leave_room_for_the_prompt(fake_engine):
    with TestClient(create_app(fake_engine, limits=ServerLimits(max_tokens=10_000))) as c:  # context: 4096
        assert_error(c.post(CHAT, json={"messages": [USER], "max_tokens": 4096}), 400,
                     message="max_tokens=4096 does not fit the context of 4096 tokens", param="max_tokens")
        assert c.post(CHAT, json={"messages": [USER], "max_tokens": 4095}).status_code == 200


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"text"'])
def test_malformed_json_is_400_not_422(client, raw):
    err = assert_error(client.post(CHAT, content=raw, headers={"content-type": "application/json"}), 400,
                       message="JSON", code="invalid_json")
    assert err["type"] == "invalid_request_error"


def test_deeply_nested_json_is_400_without_parsing_it(client, fake_engine, monkeypatch):
    def no_parse(_):
        raise AssertionError("the JSON parser ran on a body over the depth limit")

    with monkeypatch.context() as m:
        m.setattr(app_module, "json", SimpleNamespace(loads=no_parse))
        for body in (b"[" * 5000 + b"]" * 5000, b'{"messages": [' + b"[" * 5000,
                     b'{"messages": [{"role": "user", "content": "hi"}], "user": ' + b"[" * 64 + b"]" * 64 + b"}"):
            assert_error(client.post(CHAT, content=body, headers={"content-type": "application/json"}), 400,
                         message="deep; the limit is 64", code="invalid_json")
    assert not fake_engine.handles
    # 64 deep is within the limit (the schema rejects it), and brackets inside strings do not count
    r = client.post(CHAT, content=b'{"messages": [{"role": "user", "content": "hi"}], "user": ' + b"[" * 63 + b"]" * 63
                    + b"}", headers={"content-type": "application/json"})
    assert_error(r, 400, message="user: Input should be a valid string", param="user")
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": '\\"[{' * 5000}]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_json_in_other_encodings_than_utf8_is_400(client, fake_engine, encoding):
    """The byte scan cannot see their escapes: the escaped quote here would hide the nesting after it."""
    body = '{"messages": [{"role": "user", "content": "\\""}], "user": ' + "[" * 5000 + "]" * 5000 + "}"
    r = client.post(CHAT, content=body.encode(encoding), headers={"content-type": "application/json"})
    assert_error(r, 400, message="the request body", code="invalid_json")
    assert not fake_engine.handles
    bom = client.post(CHAT, content=b"\xef\xbb\xbf" + json.dumps({"messages": [USER]}).encode(),
                      headers={"content-type": "application/json"})
    assert bom.status_code == 200, bom.text  # UTF-8 with a byte-order mark is still UTF-8


def test_deeply_nested_json_limit_is_configurable(fake_engine):
    with TestClient(create_app(fake_engine, limits=ServerLimits(max_json_depth=4))) as c:
        parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
        assert_error(c.post(CHAT, json=parts), 400, message="nests arrays and objects 5 deep; the limit is 4")
        assert c.post(CHAT, json={"messages": [USER]}).status_code == 200  # 3 deep


def test_numbers_too_long_to_convert_are_400(client, fake_engine):
    body = b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}"
    assert_error(client.post(CHAT, content=body, headers={"content-type": "application/json"}), 400,
                 message="not valid JSON", code="invalid_json")
    assert not fake_engine.handles


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


def test_requested_video_frames_are_capped_by_default(fake_engine):
    with TestClient(create_app(fake_engine)) as c:
        assert_error(c.post(CHAT, json={"messages": [USER], "num_video_frames": 10**9}), 400,
                     message="num_video_frames=1000000000 is over this server's limit of 256", param="num_video_frames")
        assert c.post(CHAT, json={"messages": [USER], "num_video_frames": 256}).status_code == 200
