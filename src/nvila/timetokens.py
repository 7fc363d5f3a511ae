"""Temporal localization with discrete time tokens (LITA-style; spec nvila.md §11, training.md §6).

A checkpoint with ``num_time_tokens = N > 0`` has N regular (non-special) tokens
``time_token_format.format(t=k)`` (default ``<t0>``..``<t{N-1}>``) with contiguous ids, added after the
run-time media tokens. A time token stands for a position in a video of duration D seconds:

* encode (training data): a ``<seconds>`` literal such as ``<12.5>`` becomes ``<t{round(s / D * (N-1))}>``,
  s clamped to [0, D];
* decode (answers): ``<tk>`` becomes ``<{round(k * D / (N-1), 2)}>``, and k >= N becomes ``<{round(D, 2)}>``.

Scoring (``nvila eval``): the first two timestamps of an answer, clamped to [0, D] and sorted, are
the predicted interval (fewer than two: the whole clip); mean IoU and Precision@0.5 are means over
videos of the per-video means.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

TIME_LITERAL = re.compile(r"<(\d+(?:\.\d+)?)>")  # a "<seconds>" literal


class TimeTokenError(ValueError):
    """A tokenizer or config whose time tokens are inconsistent, or an impossible duration."""


def time_token_strings(n: int, fmt: str = "<t{t}>") -> list[str]:
    return [fmt.format(t=k) for k in range(n)]


def time_token_regex(fmt: str) -> re.Pattern:
    """``fmt`` with ``{t}`` as a captured integer, e.g. ``<t(\\d+)>``."""
    head, _, tail = fmt.partition("{t}")
    return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))


def ensure_time_tokens(tokenizer, n: int, fmt: str = "<t{t}>") -> list[int]:
    """Make sure ``tokenizer`` holds the N time tokens with contiguous ids; returns their ids.

    A tokenizer that already holds all of them (a published one) is used as it is; one that holds
    none gets them appended as regular tokens, in order (the reference's ``add_tokens``).

    Raises:
        TimeTokenError: the tokenizer holds some but not all of them, more than N of them, or not with
            contiguous ids.
    """
    if n <= 0:
        return []
    tokens = time_token_strings(n, fmt)
    vocab = tokenizer.get_vocab()
    held = [t for t in tokens if t in vocab]
    if not held:
        tokenizer.add_tokens(tokens, special_tokens=False)
        vocab = tokenizer.get_vocab()
    elif len(held) != n:
        raise TimeTokenError(f"num_time_tokens is {n} but the tokenizer holds {len(held)} of the tokens "
                             f"{tokens[0]}..{tokens[-1]}; fix num_time_tokens or the tokenizer")
    elif fmt.format(t=n) in vocab:
        more = n
        while fmt.format(t=more) in vocab:
            more += 1
        raise TimeTokenError(f"num_time_tokens is {n} but the tokenizer holds {more} time tokens "
                             f"{tokens[0]}..{fmt.format(t=more - 1)}; fix num_time_tokens or the tokenizer")
    ids = [vocab[t] for t in tokens]
    if ids != list(range(ids[0], ids[0] + n)):
        raise TimeTokenError(f"the tokenizer's time tokens {tokens[0]}..{tokens[-1]} do not have contiguous ids")
    return ids


def _check_duration(duration: float) -> None:
    if not duration > 0:
        raise TimeTokenError(f"a video duration must be > 0 seconds, got {duration}")


def encode_timestamps(text: str, duration: float, n: int, fmt: str = "<t{t}>") -> tuple[str, int]:
    """Replace every ``<seconds>`` literal in ``text`` by its time token; returns (text, clamped count)."""
    _check_duration(duration)
    clamped = 0

    def repl(m: re.Match) -> str:
        nonlocal clamped
        s = float(m.group(1))
        if s > duration:
            clamped += 1
            s = duration
        return fmt.format(t=round(s / duration * (n - 1)))

    return TIME_LITERAL.sub(repl, text), clamped


def decode_time_tokens(text: str, duration: float, n: int, fmt: str = "<t{t}>") -> str:
    """Replace every time token in ``text`` by ``<seconds>`` for a video of ``duration`` seconds."""
    _check_duration(duration)

    def repl(m: re.Match) -> str:
        k = int(m.group(1))
        return f"<{round(duration, 2)}>" if k >= n else f"<{round(k * duration / (n - 1), 2)}>"

    return time_token_regex(fmt).sub(repl, text)


class TimeTokenStream:
    """``decode_time_tokens`` over streamed text: ``push`` returns what can be sent now, holding back
    a tail that may still grow into a time token; ``flush`` returns the rest."""

    def __init__(self, duration: float, n: int, fmt: str = "<t{t}>"):
        _check_duration(duration)
        self.duration, self.n, self.fmt = duration, n, fmt
        head, _, tail = fmt.partition("{t}")
        # a suffix that is a proper prefix of some time token: the head's prefix, or head + digits
        self._partial = re.compile("(?:" + "|".join(
            [re.escape(head[:i]) for i in range(1, len(head) + 1)]
            + [re.escape(head) + r"\d+" + re.escape(tail[:i]) for i in range(len(tail))]) + r")\Z")
        self._held = ""

    def push(self, text: str) -> str:
        text = self._held + text
        m = self._partial.search(text)
        cut = m.start() if m else len(text)
        self._held = text[cut:]
        return decode_time_tokens(text[:cut], self.duration, self.n, self.fmt)

    def flush(self) -> str:
        out, self._held = decode_time_tokens(self._held, self.duration, self.n, self.fmt), ""
        return out


def timestamps(text: str) -> list[float]:
    """The ``<seconds>`` literals of ``text``, in order."""
    return [float(s) for s in TIME_LITERAL.findall(text)]


def segments(text: str) -> list[list[float]]:
    """Consecutive pairs of timestamps, each sorted: ``"<1.5> <4> and <9> <7>"`` -> [[1.5, 4], [7, 9]]."""
    ts = timestamps(text)
    return [sorted(ts[i:i + 2]) for i in range(0, len(ts) - 1, 2)]


def predicted_interval(text: str, duration: float) -> tuple[float, float]:
    """The reference's rule: the first two timestamps, clamped to [0, D] and sorted; else (0, D)."""
    ts = timestamps(text)
    if len(ts) < 2:
        return 0.0, float(duration)
    a, b = (min(max(t, 0.0), duration) for t in ts[:2])
    return (a, b) if a <= b else (b, a)


def iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Temporal IoU of two [start, end] intervals (0 when the union is empty)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def localization_scores(samples: Iterable[tuple[str, str, tuple[float, float], float]]) -> dict[str, float]:
    """Mean IoU and Precision@0.5 over (video id, answer, ground truth [start, end], duration) samples,
    as the mean over videos of the per-video means."""
    per_video: dict[str, list[float]] = defaultdict(list)
    for video, answer, truth, duration in samples:
        per_video[video].append(iou(predicted_interval(answer, duration), truth))
    if not per_video:
        raise ValueError("no samples to score")
    videos = list(per_video.values())
    return {"miou": sum(sum(v) / len(v) for v in videos) / len(videos),
            "p_at_0.5": sum(sum(x >= 0.5 for x in v) / len(v) for v in videos) / len(videos),
            "videos": len(videos)}
