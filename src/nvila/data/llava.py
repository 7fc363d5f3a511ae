"""LLaVA-style records, shared by training (``nvila.train.data``) and evaluation (``nvila.eval``).

Record format (spec §2.1)::

    {"image": "a.jpg" | ["a.jpg", "b.jpg"], "video": "clip.mp4" | "frames_dir/",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

Media paths are relative to a media root. As in the reference, the ``<image>`` / ``<video>``
markers are stripped from the text and the media are prepended to the first human turn. This module
reads files and builds processor messages; it knows no tokenizer, labels or model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MARKERS = ("<image>", "<video>")


class DataFileError(ValueError):
    """A data file is unreadable or not a list of records."""


class BadSample(Exception):
    """A record that cannot be used; ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def read_records(path: Path) -> list[dict]:
    """All records of a ``.json`` (a list) or ``.jsonl`` file.

    Raises:
        DataFileError: an unreadable file, invalid JSON, or not a list.
    """
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except (OSError, ValueError) as e:
        raise DataFileError(f"{path}: unreadable data file ({e})") from None
    if not isinstance(records, list):
        raise DataFileError(f"{path}: expected a JSON list of samples (or JSONL, one per line)")
    return records


def to_conversation(record: dict, media_root: Path) -> list[dict]:
    """A LLaVA record -> processor messages; media become parts of the first human turn (a record's
    ``fps``, the frame rate of its frame-directory video, goes on the video part).

    Raises:
        BadSample: no conversations, a first turn that is not human, an empty answer, missing media.
    """
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadSample("no conversations")
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    messages = []
    for t in turns:
        role = roles.get(t.get("from") if isinstance(t, dict) else None)
        if role is None or not isinstance(t.get("value"), str):
            raise BadSample("malformed turn", repr(t)[:80])
        text = t["value"]
        for marker in MARKERS:
            text = text.replace(marker, "")
        if role == "assistant" and not text.strip():
            raise BadSample("empty answer")
        messages.append({"role": role, "content": text.strip()})
    first = next((m for m in messages if m["role"] != "system"), None)
    if first is None or first["role"] != "user":
        raise BadSample("first turn is not human")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadSample("no answer")
    parts = []
    for kind in ("image", "video"):
        value = record.get(kind)
        for rel in ([value] if isinstance(value, str) else value or []):
            path = Path(rel) if os.path.isabs(rel) else media_root / rel
            if not path.exists():
                raise BadSample("missing media", str(path))
            part = {"type": kind, kind: str(path)}
            if kind == "video" and record.get("fps") is not None:
                part["fps"] = record["fps"]  # a frame directory's frame rate (its duration for time tokens)
            parts.append(part)
    first["content"] = parts + [{"type": "text", "text": first["content"]}]
    return messages
