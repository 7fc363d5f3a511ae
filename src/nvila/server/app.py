"""The OpenAI-compatible HTTP app around one engine: ``create_app(engine, ...)``.

Routes: ``POST /v1/chat/completions`` (JSON or SSE stream), ``GET /v1/models``, ``GET /health`` and
the web demo page at ``/``. The app never serialises requests: each one is submitted to the engine
(the processor runs in a worker thread) and the engine batches whatever is running.

Contracts:

* every error is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status: malformed
  JSON, JSON nested deeper than ``ServerLimits.max_json_depth`` (found by a linear scan before the
  recursive parser runs) and schema errors, out-of-range numbers included, are 400 (never FastAPI's
  422), a missing or wrong API key 401, a body over ``ServerLimits.max_body_bytes`` 413, an unknown
  route 404;
* a request the engine fails (its error event) is a 500 for a JSON answer, and an error event
  followed by ``data: [DONE]`` for a stream; every other request goes on;
* ``logprobs`` come from the engine's events (``TokenEvent.logprobs``): a JSON answer carries all
  of them, a stream chunk those of the tokens it carries; ``response_format`` goes to the engine,
  whose refusal (``ConstraintError``: unknown type, invalid schema) is a 400 naming it;
* a request's temporary media files are deleted as soon as the engine has taken it, and a request
  whose client goes away (mid-stream or while waiting for a JSON answer) is cancelled in the engine;
* one log line per finished request (logger ``nvila.server.app``, level INFO): id, finish reason,
  prompt/visual/completion tokens, TTFT, prefill and decode tokens/s;
* the app owns the engine: leaving the lifespan calls ``engine.shutdown(wait=True)``.

This module knows HTTP and the engine's public contract (``nvila.engine.api``); it knows nothing
about tokenizers, pixels or models.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from importlib import resources
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.api import ConstraintError, GenerationRequest, TokenEvent
from ..media import MediaError
from .inputs import MediaPolicy, to_engine_messages
from .limits import ServerLimits
from .protocol import (ApiError, AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
                       ChoiceLogprobs, ChunkChoice, Delta, ModelCard, ModelList, PromptTokensDetails, Usage)

logger = logging.getLogger(__name__)



class _BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes``, by Content-Length or while it streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _error(self) -> ApiError:
        return ApiError(413, f"the request body is larger than the limit of {self.max_bytes} bytes",
                        code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _error_response(self._error())(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self._error()  # raised inside request.body(): the ApiError handler answers
            return message

        await self.app(scope, limited_receive, send)


class _EventStream(StreamingResponse):
    """An SSE response that calls ``on_close`` however it ends (finished, failed or disconnected)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _param_path(loc: tuple) -> str:
    """A pydantic error location as OpenAI names params: ``messages[0].content[1].image_url.url``.

    Union branch labels (``str``, ``list[...]``) and discriminator tags (a tag is followed by the
    field of the same name) are dropped.
    """
    parts = [x for i, x in enumerate(loc) if not (isinstance(x, str) and (
        "[" in x or x in ("str", "list") or (i + 1 < len(loc) and loc[i + 1] == x)))]
    out = ""
    for x in parts:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    """The most specific error (deepest location: for ``str | list`` content, the list branch's)."""
    err = max(e.errors(), key=lambda x: len(x["loc"]))
    loc = _param_path(err["loc"])
    return (f"{loc}: {err['msg']}" if loc else err["msg"]), (loc or None)


_NOT_MARKS = bytes(sorted(set(range(256)) - set(b'"[]{}')))
_SCAN_CHUNK = 1 << 20  # marks per numpy pass: bounds the scan's memory to a few MiB


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, found without parsing it.

    Linear time in C-speed passes and no recursion, so a hostile body nested thousands deep costs
    what its bytes cost. Escaped backslashes go first (a run of them pairs from the left), then
    escaped quotes; every ``"`` left delimits a string, and a bracket after an odd number of them is
    string text. Invalid JSON gets a number too (the parser then rejects it).
    """
    marks = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_MARKS)
    marks = np.frombuffer(marks, dtype=np.uint8)
    deepest = level = quotes = 0
    for start in range(0, len(marks), _SCAN_CHUNK):
        chunk = marks[start:start + _SCAN_CHUNK]
        quote = chunk == ord('"')
        text = (quotes + np.cumsum(quote)) % 2 == 1  # inside a string (or on its opening quote)
        opens = (chunk == ord("[")) | (chunk == ord("{"))
        depth = level + np.cumsum(np.where(quote | text, 0, np.where(opens, 1, -1)))
        deepest, level, quotes = max(deepest, int(depth.max())), int(depth[-1]), quotes + int(quote.sum())
    return deepest


def parse_request(body: bytes, max_depth: int = ServerLimits.max_json_depth) -> ChatCompletionRequest:
    """Request body -> validated request; ``ApiError`` 400 for bad or too deeply nested JSON, or a
    schema violation.

    The body must be UTF-8 (RFC 8259; a leading BOM is dropped): the text the depth scan read is the
    text parsed. (``json.loads`` on bytes would also guess UTF-16 and UTF-32, whose escapes the
    byte scan cannot see.)
    """
    depth = json_depth(body)
    if depth > max_depth:
        raise ApiError(400, f"the request body nests arrays and objects {depth} deep; the limit is {max_depth}",
                       code="invalid_json")
    try:
        data = json.loads(body.decode("utf-8-sig"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, or an integer of over 4300 digits
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        message, param = _validation_message(e)
        raise ApiError(400, message, param=param, code="invalid_request") from None


GREEDY_BELOW = 1e-5  # temperatures under this decode greedily, as vLLM's: float32 logits / ~1e-37 overflow


def generation_request(req: ChatCompletionRequest, limits: ServerLimits, context_length: int) -> GenerationRequest:
    """The engine request for a validated chat request, with the limits applied; ``messages`` are
    left empty for the caller to fill in (media conversion comes after these cheap checks).

    Sampling follows OpenAI: ``temperature`` defaults to 1 (sampling); 0 (or under ``GREEDY_BELOW``)
    means greedy decoding. ``max_tokens`` must leave room for a prompt of one token in the context.
    """
    if req.n != 1:
        raise ApiError(400, f"n={req.n} is not supported: this server returns one choice per request", param="n")
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    max_tokens = req.max_completion_tokens or req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens={max_tokens} is over this server's limit of {limits.max_tokens}",
                       param=param, code="max_tokens_over_limit")
    if max_tokens is not None and max_tokens >= context_length:
        raise ApiError(400, f"max_tokens={max_tokens} does not fit the context of {context_length} tokens, "
                       "prompt included", param=param, code="max_tokens_over_limit")
    frames = req.num_video_frames
    if frames is not None and limits.max_video_frames is not None and frames > limits.max_video_frames:
        raise ApiError(400, f"num_video_frames={frames} is over this server's limit of {limits.max_video_frames}",
                       param="num_video_frames")
    temperature = 1.0 if req.temperature is None else req.temperature
    sampled = temperature >= GREEDY_BELOW
    return GenerationRequest(messages=[], max_tokens=max_tokens or limits.max_tokens,
                             do_sample=sampled, temperature=temperature if sampled else 1.0,
                             top_p=req.top_p or 1.0, top_k=req.top_k or 0,
                             repetition_penalty=req.repetition_penalty or 1.0, seed=req.seed, stop=req.stop_list(),
                             options={"num_video_frames": frames} if frames is not None else {},
                             logprobs=req.logprobs, top_logprobs=req.top_logprobs or 0,
                             response_format=(req.response_format.model_dump(by_alias=True)
                                              if req.response_format is not None else None))


class _Run:
    """One submitted request: its id, what ended it, and the end-of-request log line."""

    def __init__(self, handle, model_id: str, logprobs: bool):
        self.handle, self.model_id, self.logprobs = handle, model_id, logprobs
        self.id = f"chatcmpl-{handle.id}"
        self.created = int(time.time())
        self.end: TokenEvent | None = None
        self._closed = False

    def usage(self) -> Usage:
        m = self.handle.metrics
        return Usage(prompt_tokens=m.prompt_tokens, completion_tokens=m.completion_tokens,
                     total_tokens=m.prompt_tokens + m.completion_tokens, visual_tokens=list(m.visual_tokens),
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=m.cached_tokens))

    def close(self) -> None:
        """Cancel the request if it has not ended (client gone), then log it once."""
        if self._closed:
            return
        self._closed = True
        if self.end is None:
            self.handle.cancel()
        m = self.handle.metrics
        reason = self.end.finish_reason if self.end is not None else "cancelled (client disconnected)"
        logger.info("%s: %s; prompt %d tokens (visual %s), completion %d tokens; TTFT %.3f s; prefill %.1f tokens/s; "
                    "decode %.1f tokens/s", self.handle.id, reason, m.prompt_tokens, list(m.visual_tokens),
                    m.completion_tokens, m.ttft_s, m.prefill_tokens_per_s, m.decode_tokens_per_s)

    def failure(self) -> ApiError | None:
        """The error that ended the request, if it did not end with stop/length."""
        if self.end is None or self.end.finish_reason == "error":
            detail = self.end.error if self.end is not None else "the stream ended without a finish event"
            return ApiError(500, f"generation failed: {detail}", type="server_error", code="generation_error")
        if self.end.finish_reason == "abort":
            return ApiError(503, "the request was aborted: the server is shutting down", type="server_error",
                            code="aborted")
        return None

    def _logprobs(self, events: list[TokenEvent]) -> ChoiceLogprobs | None:
        """The logprobs of ``events``' tokens (None when the request did not ask)."""
        if not self.logprobs:
            return None
        return ChoiceLogprobs(content=[dataclasses.asdict(lp) for ev in events for lp in ev.logprobs or []])

    def chunk(self, delta: Delta, finish_reason: str | None = None, logprobs: ChoiceLogprobs | None = None) -> str:
        c = ChatCompletionChunk(id=self.id, created=self.created, model=self.model_id,
                                choices=[ChunkChoice(delta=delta, finish_reason=finish_reason, logprobs=logprobs)])
        return f"data: {c.model_dump_json()}\n\n"

    async def stream(self, include_usage: bool) -> AsyncIterator[str]:
        """SSE events: role first, text deltas (with their tokens' logprobs, if asked), finish
        reason last, then usage (if asked) and [DONE]."""
        yield self.chunk(Delta(role="assistant", content=""))
        async for ev in self.handle:
            if ev.text or ev.logprobs:
                yield self.chunk(Delta(content=ev.text), logprobs=self._logprobs([ev]))
            if ev.finish_reason is not None:
                self.end = ev
                break
        error = self.failure()
        if error is not None:
            yield f"data: {json.dumps(error.body())}\n\n"
        else:
            yield self.chunk(Delta(), self.end.finish_reason)
            if include_usage:
                c = ChatCompletionChunk(id=self.id, created=self.created, model=self.model_id, choices=[],
                                        usage=self.usage())
                yield f"data: {c.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"

    async def collect(self, request: Request) -> tuple[str, ChoiceLogprobs | None]:
        """The whole answer and its logprobs; cancels the request if the client disconnects first."""
        events: list[TokenEvent] = []
        async with anyio.create_task_group() as tg:
            async def watch_disconnect():
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            async for ev in self.handle:
                events.append(ev)
                if ev.finish_reason is not None:
                    self.end = ev
                    break
            tg.cancel_scope.cancel()
        return "".join(ev.text for ev in events), self._logprobs(events)


def _check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", type="authentication_error",
                       code="missing_api_key")
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "incorrect API key", type="authentication_error", code="invalid_api_key")


def create_app(engine, *, api_key: str | None = None, allow_local_media: bool = False,
               allow_remote_media: bool = False, limits: ServerLimits = ServerLimits()) -> FastAPI:
    """Build the app around a running engine.

    Args:
        engine: an ``nvila.engine.Engine`` (or anything with its contract: ``model_id``,
            ``context_length``, ``submit``, ``shutdown``). The app shuts it down on lifespan exit.
        api_key: if set, every ``/v1`` route needs ``Authorization: Bearer <api_key>``.
        allow_local_media: accept local paths and ``file://`` URLs as media.
        allow_remote_media: fetch ``http(s)://`` media URLs.
        limits: per-request limits.

    Returns:
        The FastAPI app (serve it with uvicorn).
    """
    policy = MediaPolicy(allow_local=allow_local_media, allow_remote=allow_remote_media, max_media=limits.max_media,
                         max_download_bytes=limits.max_body_bytes)
    page = (resources.files(__package__) / "static" / "index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        logger.info("shutting down the engine")
        await anyio.to_thread.run_sync(partial(engine.shutdown, wait=True))

    app = FastAPI(title="nvila", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else "method_not_allowed" if e.status_code == 405 else None
        return _error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=kind))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, e: Exception):
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error_response(ApiError(500, f"internal server error ({type(e).__name__})", type="server_error"))

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_id}

    @app.get("/v1/models")
    async def models(request: Request) -> ModelList:
        _check_key(request, api_key)
        return ModelList(data=[ModelCard(id=engine.model_id, created=int(time.time()),
                                         context_length=engine.context_length)])

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _check_key(request, api_key)
        req = parse_request(await request.body(), limits.max_json_depth)
        gen = generation_request(req, limits, engine.context_length)
        inputs = await to_engine_messages(req.messages, policy)
        try:
            gen = dataclasses.replace(gen, messages=inputs.messages)
            handle = await anyio.to_thread.run_sync(engine.submit, gen)
        except MediaError as e:
            raise ApiError(400, inputs.describe(str(e)), param="messages", code="invalid_media") from None
        except ConstraintError as e:
            raise ApiError(400, str(e), param="response_format", code="invalid_response_format") from None
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e), param="messages") from None
        except RuntimeError as e:  # the engine is shut down
            raise ApiError(503, f"the engine is unavailable: {e}", type="server_error",
                           code="engine_unavailable") from None
        finally:
            inputs.cleanup()  # the engine decoded the media at submit
        run = _Run(handle, engine.model_id, req.logprobs)
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return _EventStream(run.stream(include_usage), on_close=run.close)
        try:
            text, logprobs = await run.collect(request)
        finally:
            run.close()
        error = run.failure()
        if error is not None:
            raise error
        return ChatCompletion(id=run.id, created=run.created, model=engine.model_id, usage=run.usage(),
                              choices=[Choice(message=AssistantMessage(content=text),
                                              finish_reason=run.end.finish_reason, logprobs=logprobs)])

    return app
