"""OpenAI messages -> the processor's messages, under the server's media policy.

Media sources, by URL form:

* ``data:`` URLs are always accepted. Images are passed on as they are (``nvila.media`` decodes
  them); videos (``data:video/...;base64,``) are written to a temporary file, because PyAV reads
  files. The caller deletes the temporary files (``Inputs.cleanup``) once the engine has taken the
  request: the engine decodes media at submit time.
* ``http(s)://`` URLs only when ``allow_remote``: fetched here with a timeout and a size cap.
* local paths (and ``file://`` URLs) only when ``allow_local``.

Every policy violation raises ``ApiError`` (400, or 413 for an oversized download). Decoding the
media, and so reporting corrupt ones, is left to the engine's processor. This module knows nothing
about tokens or models.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

import anyio
import httpx

from .protocol import ApiError, ChatMessage, ImageURLPart, TextPart

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaPolicy:
    """Where media may come from, and how much of them.

    Args:
        allow_local: accept local paths and ``file://`` URLs (they read the server's disk).
        allow_remote: fetch ``http(s)://`` URLs (the server makes outbound requests).
        max_media: most images + videos in one request.
        max_download_bytes: largest remote medium fetched.
        fetch_timeout_s: timeout of one remote fetch.
    """

    allow_local: bool = False
    allow_remote: bool = False
    max_media: int = 16
    max_download_bytes: int = 64 << 20
    fetch_timeout_s: float = 30.0


@dataclass
class Inputs:
    """The processor's messages, plus the temporary files they point to (path -> request param)."""

    messages: list[dict]
    temp_files: dict[str, str] = field(default_factory=dict)

    def cleanup(self) -> None:
        """Delete the temporary files (idempotent)."""
        while self.temp_files:
            path, _ = self.temp_files.popitem()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def describe(self, message: str) -> str:
        """``message`` with temporary file paths replaced by the request params they came from."""
        for path, param in self.temp_files.items():
            message = message.replace(path, param)
        return message


def _param(i: int, j: int) -> str:
    return f"messages[{i}].content[{j}]"


def _decode_data_url(url: str, kind: str, param: str) -> tuple[bytes, str]:
    """``data:<kind>/<sub>;base64,<payload>`` -> (payload bytes, suffix for a file)."""
    head, sep, payload = url.partition(",")
    mime, *params = head[len("data:"):].lower().split(";")
    if not sep or "base64" not in params:
        raise ApiError(400, f"{head[:64]}: a {kind} data URL must be 'data:{kind}/...;base64,<payload>'", param=param)
    if not mime.startswith(kind + "/"):
        raise ApiError(400, f"{head[:64]}: media type {mime or 'missing'!r} is not {kind}/*", param=param)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{head[:64]}: the data URL payload is not valid base64", param=param) from None
    if not data:
        raise ApiError(400, f"{head[:64]}: the data URL payload is empty", param=param)
    sub = mime.split("/", 1)[1]
    return data, "." + ("".join(c for c in sub if c.isalnum())[:8] or "bin")


async def _fetch(url: str, policy: MediaPolicy, param: str) -> bytes:
    """GET a remote medium, at most ``policy.max_download_bytes``."""
    try:
        async with (httpx.AsyncClient(timeout=policy.fetch_timeout_s, follow_redirects=True) as client,
                    client.stream("GET", url) as r):
            if r.status_code != 200:
                raise ApiError(400, f"{url[:200]}: fetching it returned HTTP {r.status_code}", param=param)
            chunks, size = [], 0
            async for chunk in r.aiter_bytes():
                size += len(chunk)
                if size > policy.max_download_bytes:
                    raise ApiError(413, f"{url[:200]}: larger than the limit of {policy.max_download_bytes} bytes",
                                   param=param, code="media_too_large")
                chunks.append(chunk)
    except httpx.HTTPError as e:
        raise ApiError(400, f"{url[:200]}: cannot be fetched ({type(e).__name__}: {e})", param=param) from None
    if not size:
        raise ApiError(400, f"{url[:200]}: the response is empty", param=param)
    return b"".join(chunks)


async def _write_temp(data: bytes, suffix: str, inputs: Inputs, param: str) -> str:
    fd, path = tempfile.mkstemp(prefix="nvila-serve-", suffix=suffix)
    inputs.temp_files[path] = param  # registered first: cleaned up even if the write fails
    with os.fdopen(fd, "wb") as f:
        await anyio.to_thread.run_sync(f.write, data)
    return path


async def _medium(kind: str, url: str, policy: MediaPolicy, inputs: Inputs, param: str):
    """One media URL -> the value of a processor ``image`` / ``video`` part."""
    scheme = urlparse(url).scheme.lower() if "://" in url[:16] or url[:5].lower() == "data:" else ""
    if scheme == "data":
        if kind == "image":
            return url
        data, suffix = _decode_data_url(url, "video", param)
        return await _write_temp(data, suffix, inputs, f"{param} (data URL)")
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise ApiError(400, f"{url[:200]}: remote media URLs are disabled on this server (start it with "
                                "--allow-remote-media); send the medium as a data: URL", param=param,
                           code="remote_media_disabled")
        data = await _fetch(url, policy, param)
        if kind == "image":
            return data
        suffix = os.path.splitext(urlparse(url).path)[1][:8] or ".mp4"
        return await _write_temp(data, suffix, inputs, url[:200])
    if scheme not in ("", "file"):
        raise ApiError(400, f"{url[:200]}: unsupported URL scheme {scheme!r}; use data:, http(s):// or a path",
                       param=param)
    if not policy.allow_local:
        raise ApiError(400, f"{url[:200]}: local media paths are disabled on this server (start it with "
                            "--allow-local-media); send the medium as a data: URL", param=param,
                       code="local_media_disabled")
    return unquote(urlparse(url).path) if scheme == "file" else url


async def to_engine_messages(messages: list[ChatMessage], policy: MediaPolicy) -> Inputs:
    """Convert validated OpenAI messages into the processor's format.

    Args:
        messages: the request's messages.
        policy: where media may come from.

    Returns:
        ``Inputs``; call ``cleanup()`` once the engine has the request, also on failure.

    Raises:
        ApiError: a policy violation (400), or a remote medium over the size cap (413). Temporary
            files written before the error are already deleted.
    """
    n_media = sum(1 for m in messages if isinstance(m.content, list)
                  for p in m.content if not isinstance(p, TextPart))
    if n_media > policy.max_media:
        raise ApiError(400, f"{n_media} media in one request is over the limit of {policy.max_media}",
                       param="messages", code="too_many_media")
    inputs = Inputs(messages=[])
    try:
        for i, m in enumerate(messages):
            role = "system" if m.role == "developer" else m.role
            if not isinstance(m.content, list):
                inputs.messages.append({"role": role, "content": m.content})
                continue
            parts = []
            for j, p in enumerate(m.content):
                if isinstance(p, TextPart):
                    parts.append({"type": "text", "text": p.text})
                    continue
                kind, url = ("image", p.image_url.url) if isinstance(p, ImageURLPart) else ("video", p.video_url.url)
                part = {"type": kind, kind: await _medium(kind, url, policy, inputs, _param(i, j))}
                if kind == "video" and p.fps is not None:
                    part["fps"] = p.fps
                parts.append(part)
            inputs.messages.append({"role": role, "content": parts})
    except BaseException:
        inputs.cleanup()
        raise
    return inputs
