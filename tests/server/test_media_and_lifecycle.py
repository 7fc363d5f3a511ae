"""In-process tests of media sources (data URLs, temp files, local paths, remote URLs) and of request
lifecycles: client disconnects cancel the engine request (and, in the real engine, free its slot and
KV cache), requests run concurrently, one log line per request, and the engine is shut down with the
app."""

from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import json
import logging
import os
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from nvila.engine import Engine, EngineConfig
from nvila.server import ServerLimits, create_app

from server_testing import ASSETS
from test_api import CHAT, png_data_url
from test_errors import assert_error, image, video

MP4 = (ASSETS / "example.mp4").read_bytes()
MP4_URL = "data:video/mp4;base64," + base64.b64encode(MP4).decode()


def test_video_data_url_becomes_a_temp_file_that_is_deleted(fake_engine, media_tmp):
    with TestClient(create_app(fake_engine)) as c:
        r = c.post(CHAT, json={"messages": [{"role": "user", "content": [
            video(MP4_URL), {"type": "text", "text": "q"}]}]})
    assert r.status_code == 200, r.text
    [(path, data)] = fake_engine.seen_files
    assert path.endswith(".mp4") and data == MP4  # the engine read the exact bytes from a real file
    assert fake_engine.requests[0].messages[0]["content"][0] == {"type": "video", "video": path}
    assert r.json()["usage"]["visual_tokens"] == [32]
    assert os.path.dirname(path) == str(media_tmp) and not os.path.exists(path)
    assert not list(media_tmp.iterdir())


def test_temp_files_are_deleted_when_the_request_fails(fake_engine, media_tmp):
    with TestClient(create_app(fake_engine)) as c:
        # the video is written, then the corrupt image fails in the engine
        r = c.post(CHAT, json={"messages": [{"role": "user", "content": [
            video(MP4_URL), image("data:image/png;base64,AAAA")]}]})
        assert_error(r, 400, message="not an image", code="invalid_media")
        # the video is written, then a later part violates the policy before the engine sees anything
        r = c.post(CHAT, json={"messages": [{"role": "user", "content": [video(MP4_URL), image("/etc/hostname")]}]})
        assert_error(r, 400, message="--allow-local-media")
    assert len(fake_engine.seen_files) == 1
    assert not list(media_tmp.iterdir())


def test_local_paths_with_the_flag(fake_engine):
    png, mp4 = ASSETS / "example.png", ASSETS / "example.mp4"
    with TestClient(create_app(fake_engine, allow_local_media=True)) as c:
        r = c.post(CHAT, json={"messages": [{"role": "user", "content": [
            image(str(png)), video(f"file://{mp4}"), {"type": "text", "text": "q"}]}]})
    assert r.status_code == 200, r.text
    assert fake_engine.requests[0].messages[0]["content"][:2] == [{"type": "image", "image": str(png)},
                                                                  {"type": "video", "video": str(mp4)}]
    assert r.json()["usage"]["visual_tokens"] == [1000 % 7, 32]


@pytest.fixture(scope="module")
def file_server():
    """A static file server for ``assets/`` on a free port of 127.0.0.1."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(ASSETS))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_remote_media_with_the_flag(fake_engine, file_server, media_tmp):
    with TestClient(create_app(fake_engine, allow_remote_media=True)) as c:
        r = c.post(CHAT, json={"messages": [{"role": "user", "content": [
            image(f"{file_server}/example.png"), video(f"{file_server}/example.mp4")]}]})
        assert r.status_code == 200, r.text
        part = fake_engine.requests[0].messages[0]["content"][0]
        assert part["image"] == (ASSETS / "example.png").read_bytes()
        assert fake_engine.seen_files[0][1] == MP4
        assert_error(c.post(CHAT, json={"messages": [{"role": "user", "content": [image(f"{file_server}/nope.png")]}]}),
                     400, message="returned HTTP 404", param="messages[0].content[0]")
        assert_error(c.post(CHAT, json={"messages": [{"role": "user", "content": [image("http://127.0.0.1:9/x.png")]}]}),
                     400, message="cannot be fetched")
    with TestClient(create_app(fake_engine, allow_remote_media=True, limits=ServerLimits(max_body_bytes=50_000))) as c:
        r = c.post(CHAT, json={"messages": [{"role": "user", "content": [image(f"{file_server}/example.png")]}]})
        assert_error(r, 413, message="larger than the limit of 50000 bytes", code="media_too_large")
    assert not list(media_tmp.iterdir())


# ------------------------------------------------------------------------------------- lifecycle
def _scope(body: bytes) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": CHAT, "raw_path": CHAT.encode(), "query_string": b"",
            "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}


async def _call_then_disconnect(app, body: dict, *, after_first_chunk: bool = False,
                                after: threading.Event | None = None) -> list[dict]:
    """Drive the app as a server would, with a client that disconnects early: once ``after`` is set
    if given, else after the first body chunk (or 0.1 s)."""
    raw = json.dumps(body).encode()
    sent: list[dict] = []
    first = asyncio.Event()
    calls = 0

    async def receive():
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": raw, "more_body": False}
        if after is not None:
            await asyncio.to_thread(after.wait, 60)
        elif after_first_chunk:
            await first.wait()
        else:
            await asyncio.sleep(0.1)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first.set()

    await asyncio.wait_for(app(_scope(raw), receive, send), timeout=10)
    return sent


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_engine_request(fake_engine, caplog, stream):
    fake_engine.delay = 0.1  # 12 events: 1.2 s if it ran to the end
    app = create_app(fake_engine)
    body = {"messages": [{"role": "user", "content": " ".join(["word"] * 10)}], "stream": stream}
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="nvila.server"):
        asyncio.run(_call_then_disconnect(app, body, after_first_chunk=stream))
    elapsed = time.perf_counter() - start
    [handle] = fake_engine.handles
    assert handle.cancelled.is_set()
    assert elapsed < 0.8, f"the request ran on for {elapsed:.2f} s after the client left"
    assert any(handle.id in r.getMessage() and "cancelled (client disconnected)" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("stream", [True, False])
def test_a_vanished_clients_slot_and_kv_cache_are_freed(tiny_lite, monkeypatch, stream):
    """The real engine with one slot: the client leaves while its request holds the slot; the
    request ends with "abort", the slot and its cache positions are released, and the next request
    (which could not run otherwise) is answered."""
    engine = Engine.from_pretrained(tiny_lite, config=EngineConfig(max_batch_size=1))
    admitted, resume, held, handles = threading.Event(), threading.Event(), [], []
    admit, step = engine._admit, engine._step

    def admit_once(r):
        admit(r)
        if not handles:
            handles.append(r.handle)
            held.append(engine.stats())
            admitted.set()

    monkeypatch.setattr(engine, "_admit", admit_once)
    monkeypatch.setattr(engine, "_step", lambda: (resume.wait(60), step())[1])  # decoding waits for the client to go
    app = create_app(engine)
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 500, "temperature": 0,
            "stream": stream}
    try:
        asyncio.run(_call_then_disconnect(app, body, after=admitted))
        resume.set()
        [victim] = handles
        [stats] = held  # while the client was there: its prompt in the only slot
        assert (stats["running"], stats["slots"], stats["kv_tokens"]) == (1, 1, victim.metrics.prompt_tokens)

        async def next_request():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await c.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})

        r = asyncio.run(next_request())
        assert r.status_code == 200, r.text
        assert victim.finish_reason == "abort" and victim.cancelled
        stats = engine.stats()
        assert (stats["running"], stats["waiting"], stats["kv_tokens"]) == (0, 0, 0)
    finally:
        resume.set()
        engine.shutdown()


def test_requests_run_concurrently(fake_engine):
    fake_engine.delay = 0.05  # 5 events: 0.25 s each
    app = create_app(fake_engine)
    n = 6

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await asyncio.gather(*(c.post(CHAT, json={"messages": [{"role": "user", "content": f"n {i}"}]})
                                          for i in range(n)))

    start = time.perf_counter()
    responses = asyncio.run(main())
    elapsed = time.perf_counter() - start
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == [f"You said: n {i}" for i in range(n)]
    assert elapsed < 0.25 * n / 2, f"{n} requests took {elapsed:.2f} s: they were serialised"


def test_one_log_line_per_request(fake_engine, caplog):
    with caplog.at_level(logging.INFO, logger="nvila.server"), TestClient(create_app(fake_engine)) as c:
        c.post(CHAT, json={"messages": [{"role": "user", "content": [image(png_data_url((13, 5))),
                                                                     {"type": "text", "text": "a b"}]}]})
        c.post(CHAT, json={"messages": [{"role": "user", "content": "x y z"}], "stream": True, "max_tokens": 2})
    lines = [r.getMessage() for r in caplog.records if r.name == "nvila.server.app" and "TTFT" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0].startswith("req-0: stop;") and "(visual [6])" in lines[0] and "completion 4 tokens" in lines[0]
    assert lines[1].startswith("req-1: length;") and "tokens/s" in lines[1]


def test_the_app_shuts_the_engine_down(fake_engine):
    with TestClient(create_app(fake_engine)) as c:
        assert c.get("/health").status_code == 200
        assert not fake_engine.shut_down
    assert fake_engine.shut_down
