"""The wire format: OpenAI chat-completions requests, responses, stream chunks and errors.

Requests are validated strictly (unknown fields are a 400, as OpenAI does), with these extensions:

* content part ``{"type": "video_url", "video_url": {"url": ...}}`` (same shape as ``image_url``),
  with an optional ``fps``: the frame rate of a video given as frames (time-token checkpoints answer
  in seconds of the video, and frames carry no rate of their own);
* request fields ``top_k``, ``repetition_penalty`` (as vLLM names them) and ``num_video_frames``
  (frames sampled per video; at most the server's limit), also accepted in vLLM's form
  ``media_io_kwargs: {"video": {"num_frames": N}}`` (what lmms-eval's OpenAI model sends);
* ``usage.visual_tokens``: visual tokens per medium, in prompt order.

``logprobs`` / ``top_logprobs`` (0..20) and ``response_format`` (``text``, ``json_object``,
``json_schema``) follow OpenAI.

Every numeric field has a range, and non-finite numbers (``NaN``, ``Infinity``) are refused; the
ranges are documented on ``ChatCompletionRequest``. A value outside its range is a 400 naming the
field in ``param``.

``ApiError`` is the one exception the app turns into ``{"error": {"message", "type", "param",
"code"}}`` with its HTTP status. This module knows no engine and no media.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator


class ApiError(Exception):
    """A request that fails with an HTTP status and OpenAI's error body.

    Args:
        status: HTTP status code.
        message: one human-readable line.
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``, ``server_error``).
        param: the request field at fault, if any.
        code: a short machine-readable code, if any.
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ----------------------------------------------------------------------------------------- requests
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class MediaURL(_Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None  # accepted for compatibility; tiling decides


class ImageURLPart(_Strict):
    type: Literal["image_url"]
    image_url: MediaURL


class VideoURLPart(_Strict):
    type: Literal["video_url"]
    video_url: MediaURL
    fps: float | None = Field(None, gt=0, le=1000)  # extension: frame rate of a video given as frames


ContentPart = Annotated[TextPart | ImageURLPart | VideoURLPart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None  # None only for assistant messages
    name: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required in {self.role} messages")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False


class VideoIOKwargs(_Strict):
    num_frames: int = Field(ge=1)


class MediaIOKwargs(_Strict):
    """vLLM's per-request media loading options; of them, only the video frame count."""

    video: VideoIOKwargs | None = None


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaSpec(_Strict):
    """OpenAI's ``json_schema``: ``schema`` is checked (and compiled) by the engine at submit."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")  # the attribute `schema` belongs to BaseModel
    strict: bool | None = None  # accepted; the schema is always enforced


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


MAX_STOP = 4  # stop sequences per request (OpenAI's limit)
MAX_STOP_CHARS = 256  # characters per stop sequence: the detokenizer holds back this much text
MAX_N = 128  # OpenAI's range for n; this server answers n=1 only (the app says so for 2..128)
SEED_RANGE = (-2**63, 2**63)  # [lo, hi): OpenAI's int64 seeds
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class ChatCompletionRequest(_Strict):
    """``POST /v1/chat/completions``. ``model`` is accepted and ignored: the server runs one model.

    Numeric ranges (a value outside is a 400 naming the field; the server's own caps on
    ``max_tokens`` and ``num_video_frames`` are checked by the app):

    * ``max_tokens`` / ``max_completion_tokens`` >= 1;
    * ``temperature`` in [0, 2] and ``top_p`` in (0, 1], as OpenAI;
    * ``top_k`` >= 0 (0 or anything above the vocabulary size: off);
    * ``repetition_penalty`` in [0.01, 100]: beyond that, dividing or multiplying float32 logits by it
      can overflow to infinities, which sampling cannot draw from;
    * ``seed`` a 64-bit signed integer, as OpenAI; negative seeds are fine (torch maps each int64
      to its own generator state);
    * ``n`` in [1, 128], as OpenAI (only 1 is served);
    * ``stop``: at most 4 sequences of at most 256 characters each;
    * ``num_video_frames`` >= 1, or ``media_io_kwargs.video.num_frames`` (vLLM's spelling; if both
      are given they must agree);
    * ``top_logprobs`` in [0, 20], as OpenAI (the app refuses it without ``logprobs: true``).
    """

    model_config = ConfigDict(allow_inf_nan=False)

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=100.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], lt=SEED_RANGE[1])
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    num_video_frames: int | None = Field(default=None, ge=1)
    media_io_kwargs: MediaIOKwargs | None = None
    user: str | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        longest = max((len(s) for s in stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"a stop sequence has at most {MAX_STOP_CHARS} characters, got one of {longest}")
        return stop

    @model_validator(mode="after")
    def _one_frame_count(self) -> "ChatCompletionRequest":
        """``media_io_kwargs.video.num_frames`` becomes ``num_video_frames``; two different counts are an error."""
        video = self.media_io_kwargs.video if self.media_io_kwargs else None
        if video is not None:
            if self.num_video_frames not in (None, video.num_frames):
                raise ValueError(f"num_video_frames={self.num_video_frames} and media_io_kwargs.video.num_frames="
                                 f"{video.num_frames} disagree")
            self.num_video_frames = video.num_frames
        return self

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


# ---------------------------------------------------------------------------------------- responses
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the engine's prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    visual_tokens: list[int] = Field(default_factory=list)  # extension: per medium, prompt order


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    """``choices[i].logprobs``: one entry per answer token (of this chunk, when streaming)."""

    content: list[TokenLogprob] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):  # OpenAI's deltas carry only the fields that changed
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nvila"
    context_length: int  # extension


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
