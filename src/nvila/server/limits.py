"""The server's per-request limits: plain data, importable without the ``[serve]`` extra."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerLimits:
    """Per-request limits; each violation is a 4xx error in OpenAI's shape.

    Args:
        max_body_bytes: largest request body (413 above it). Media travel inside the body as data
            URLs, so this also bounds their size; remote downloads are capped at the same size.
        max_json_depth: deepest nesting of arrays and objects in a request body (400 above it),
            checked by a linear scan before the body is parsed. A valid request nests 6 deep; keep
            the limit far below Python's recursion limit (1000), which the JSON parser recurses into.
        max_tokens: cap on ``max_tokens`` / ``max_completion_tokens``. A request asking for more
            gets a 400 (no silent clamping); a request that asks for nothing gets the cap.
        max_media: most images + videos in one request (400 above it).
        max_video_frames: most frames a request may ask for with ``num_video_frames`` (400 above
            it); None: no cap. Requests that do not ask get the checkpoint's own frame count.
            ``nvila serve`` sets it to the checkpoint's count unless told otherwise.
    """

    max_body_bytes: int = 32 << 20
    max_json_depth: int = 64
    max_tokens: int = 2048
    max_media: int = 16
    max_video_frames: int | None = 256
