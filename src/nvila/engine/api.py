"""The engine's public types: requests in, token events out.

The engine knows ids, embeddings and positions; the processor (called at submit time, in the
caller's thread) turns messages and media into ids and pixels, and the tokenizer turns ids back
into text deltas. Everything here is plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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


@dataclass
class RequestMetrics:
    """Per-request numbers, filled in as the request runs."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    visual_tokens: list[int] = field(default_factory=list)  # per medium
    cached_media: int = 0  # media whose features came from the vision-feature cache
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
                "queue_s": self.queue_s, "ttft_s": self.ttft_s, "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s}


@dataclass
class TokenEvent:
    """One step of a request's stream.

    ``text`` is the newly decoded text (may be empty while a multi-byte character is incomplete or
    a possible stop string is held back). The last event has ``finish_reason`` set: "stop" (stop
    token or stop string), "length" (max_tokens or context full), "abort" (cancelled or engine
    shut down) or "error" (then ``error`` holds the message).
    """

    request_id: str
    token_id: int | None
    text: str
    finish_reason: str | None = None
    error: str | None = None
