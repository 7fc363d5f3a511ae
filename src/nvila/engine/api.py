"""The engine's public types: requests in, token events out, and the logits-processor hook.

The engine knows ids, embeddings and positions; the processor (called at submit time, in the
caller's thread) turns messages and media into ids and pixels, and the tokenizer turns ids back
into text deltas. Everything here is plain data, apart from ``LogitsProcessor``, the one place where
per-request rules on the next token act (JSON constraints today; time-token rules later).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI allows


class LogitsProcessor:
    """A per-request rule on the next token's logits: ``processor(generated, logits) -> logits``.

    The engine calls a request's processors in order on its logits row before sampling, at the
    first token (after prefill) and at every decode step, then calls ``accept(token)`` on each with
    the token it sampled. Any callable ``(generated, logits) -> logits`` works as a processor; the
    engine calls ``accept`` only where it is defined, so subclass this for stateful rules.

    Contract: ``generated`` (list[int]) holds the request's sampled ids so far, read-only;
    ``logits`` (V,) float32 is the request's own copy of its row, which the processor may change in
    place; it returns the row to sample from, with at least one finite entry. Repetition penalty,
    temperature, top-k and top-p apply after the processors. A processor belongs to one request
    (the engine builds new ones per request; never share a stateful one between requests) and runs
    on the engine's scheduler thread.
    """

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def accept(self, token: int) -> bool:
        """Record the sampled ``token``; return True when the request is complete after it (it then
        ends with "stop"). Raising ends the request with "error"."""
        return False


class ConstraintError(ValueError):
    """A request's ``response_format`` cannot be served: unknown type, invalid JSON schema, or the
    grammar library missing. ``submit`` raises it; the server answers 400 naming ``response_format``."""


@dataclass
class GenerationRequest:
    """One chat completion.

    Args:
        messages: one conversation in the processor's format (roles system/user/assistant; content a
            string or parts of type text / image / video / image_url / video_url).
        max_tokens: new-token limit (None: up to the context length).
        temperature / top_p / top_k / repetition_penalty: sampling; temperature 0 or do_sample False = greedy.
        seed: per-request random seed (sampling is reproducible for a seed), in [-2**63, 2**64) as
            ``torch.Generator.manual_seed`` takes it (a negative seed wraps modulo 2**64); ``submit``
            raises ``ValueError`` outside it.
        stop: extra stop strings; the checkpoint's stop tokens apply unless ``ignore_eos``.
        ignore_eos: keep generating through stop tokens (benchmarks; fixed-length decodes).
        options: processor options (max_tiles, num_video_frames, fps).
        logprobs: report each sampled token's log-probability on the events (``TokenEvent.logprobs``).
        top_logprobs: with ``logprobs``, also the ``top_logprobs`` (0..20) most likely tokens of each step.
        response_format: constrain the answer, in OpenAI's shape: None or ``{"type": "text"}`` (free
            text), ``{"type": "json_object"}`` (any JSON object) or ``{"type": "json_schema",
            "json_schema": {"schema": {...}}}`` (JSON valid against the schema). The answer stops
            when the JSON closes; if ``max_tokens`` runs out first it ends with "length" and the
            JSON is incomplete (as on OpenAI). ``submit`` raises ``ConstraintError`` if it is invalid.
        logits_processors: extra per-request rules on the logits (see ``LogitsProcessor``); they run
            before the ``response_format`` constraint.
    """

    messages: list[dict]
    max_tokens: int | None = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: dict[str, Any] | None = None
    logits_processors: list[LogitsProcessor] = field(default_factory=list)


@dataclass
class TokenLogprob:
    """One sampled token's log-probability, in OpenAI's terms.

    ``logprob`` is ``log_softmax`` of the model's raw float32 logits at that step: before the
    logits processors (constraints), repetition penalty, temperature, top-k and top-p, so it is the
    model's own belief, whatever sampling then did. ``token`` is the token's text (a token that
    ends inside a UTF-8 character reads ``bytes:\\xe4\\xbd``), ``bytes`` its UTF-8 bytes, and
    ``top_logprobs`` the step's most likely tokens, most likely first (their own ``top_logprobs``
    empty).
    """

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class RequestMetrics:
    """Per-request numbers, filled in as the request runs."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    visual_tokens: list[int] = field(default_factory=list)  # per medium
    cached_media: int = 0  # media whose features came from the vision-feature cache
    cached_tokens: int = 0  # prompt positions whose KV came from the prefix cache
    queue_s: float = 0.0  # submit -> prefill start
    ttft_s: float = 0.0  # submit -> first token
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "visual_tokens": list(self.visual_tokens), "cached_media": self.cached_media,
                "cached_tokens": self.cached_tokens,
                "queue_s": self.queue_s, "ttft_s": self.ttft_s, "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s}


@dataclass
class TokenEvent:
    """One step of a request's stream.

    ``text`` is the newly decoded text (may be empty while a multi-byte character is incomplete or
    a possible stop string is held back). The last event has ``finish_reason`` set: "stop" (stop
    token, stop string or a completed ``response_format``), "length" (max_tokens or context
    full), "abort" (cancelled or engine shut down) or "error" (then ``error`` holds the message).

    ``logprobs`` (requests that asked for them) covers the tokens sampled since the previous event,
    in order, so that the events of a request together cover its answer's tokens; a stop token that
    ends the request is not part of the answer and has none.
    """

    request_id: str
    token_id: int | None
    text: str
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
