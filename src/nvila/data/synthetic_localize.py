"""SynthVILA's temporal-localization family ``video_localize`` (issue 19; spec nvila.md §11).

Contract: ``localize_sample(family, seed, i, media, rel, opts)`` is the family's builder, called by
``nvila.data.synthetic.generate`` like every other family's. Sample ``i`` of a seed is a clip of
``frames`` PNG frames at a declared ``fps`` (duration ``D = frames / fps`` seconds) on the video
families' noisy checker background, in which one coloured square is on screen during ``[start, end)``
seconds and absent otherwise. The question asks when it appears; the answer is ``"<start> <end>"``, the
``<seconds>`` literals the trainer turns into time tokens (``nvila.train.data``) and the scorer reads
back (``nvila.timetokens``). The record carries ``fps``, ``duration`` and ``segment`` (``[start,
end]``), so ``nvila eval`` scores it as localization (mean IoU, Precision@0.5).

Temporal resolution (why the intervals are resolvable by the bundled model): the model samples 16
frames and pools them 4x in time (``TSPVideoEncoder``, pool ``[4, 1, 1]``), so it sees 4 time bins of
4 frames each. The defaults draw 16 frames at 2 fps (D = 8 s: every frame is sampled), and the
interval's ends lie on a grid of ``slot`` = 2 frames (1 s, half a bin). An interval spans 2-4 slots
(2-4 s). Average pooling sees how much of each bin the square covers (none, half or all), not which
half; but an interval of >= 2 slots is contiguous, so a half-covered bin next to a covered one (or
two half-covered neighbours) fixes which half: every interval of the family maps to a distinct
sequence of bin coverages. (A 1-slot interval inside one bin would be ambiguous; there are none.)
There are 7 + 6 + 5 = 18 distinct intervals at the defaults.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .synthetic import COLOURS, _save_png, render_clip


def localize_clip(rng: np.random.Generator, *, frames: int, size: int, slot: int, lengths: tuple[int, int]) -> dict:
    """A ``render_clip`` description with one square on screen for ``L`` slots of ``slot`` frames,
    ``L`` uniform in ``lengths`` (inclusive), starting at a uniform slot boundary.

    Raises:
        ValueError: ``frames`` is not a whole number of slots, or the longest interval does not fit.
    """
    if slot < 1 or frames % slot:
        raise ValueError(f"frames ({frames}) must be a whole number of slots of {slot} frames")
    slots = frames // slot
    if not 1 <= lengths[0] <= lengths[1] < slots:
        raise ValueError(f"interval lengths {tuple(lengths)} (slots) must lie in [1, {slots - 1}]")
    length = int(rng.integers(lengths[0], lengths[1] + 1))
    first = int(rng.integers(0, slots - length + 1))
    s = int(rng.integers(size // 3, size // 2 + 1))
    box = [int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1)), s, s]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    return {"frames": frames, "size": size, "background": int(rng.integers(1 << 30)),
            "events": [{"colour": colour, "start": first * slot, "duration": length * slot, "box": box}]}


def _seconds(x: float) -> str:
    return f"{x:g}"


def localize_sample(family: str, seed: int, i: int, media: Path, rel: str, opts: dict) -> tuple[dict, list[str]]:
    """One ``video_localize`` sample: the frames under ``media/<i>/``, and the record's fields
    (``video``, ``fps``, ``duration``, ``segment``, ``scene``) with the answer ``"<start> <end>"``.
    ``opts["fps"]`` is a frame rate, or a list of them, one drawn per clip (the same frames then
    last different times: the clip's duration is not visible in its frames)."""
    choices = opts["fps"] if isinstance(opts["fps"], (list, tuple)) else [opts["fps"]]
    if not choices or not all(isinstance(x, (int, float)) and x > 0 for x in choices):
        raise ValueError(f"fps must be > 0 (or a list of such), got {opts['fps']!r}")
    rng = np.random.default_rng([seed, 3, i])
    clip = localize_clip(rng, frames=opts["frames"], size=opts["size"], slot=opts["slot"],
                         lengths=tuple(opts["lengths"]))
    for f, frame in enumerate(render_clip(clip, opts["noise"])):
        _save_png(frame, media / f"{i:07d}" / f"{f:04d}.png")
    fps = float(choices[int(rng.integers(len(choices)))] if len(choices) > 1 else choices[0])
    event = clip["events"][0]
    start, end = event["start"] / fps, (event["start"] + event["duration"]) / fps
    fields = {"video": f"{rel}/{i:07d}", "fps": fps, "duration": clip["frames"] / fps, "segment": [start, end],
              "scene": clip}
    return fields, [f"<{_seconds(start)}> <{_seconds(end)}>"]


def interval_baselines(segments: list[tuple[float, float]], duration: float | list[float], *, draws: int = 20_000,
                       seed: int = 0) -> dict[str, dict[str, float]]:
    """The two reference points of a localization split (one question per video, as the family's):

    * ``whole_clip``: always answer ``[0, D]`` (also what the scorer predicts for an answer without
      two timestamps); IoU = length / D.
    * ``random``: an interval whose ends are two independent uniform draws on ``[0, D]``, sorted;
      Monte Carlo over ``draws`` intervals per ground-truth segment, seeded.

    ``duration`` is the clips' D, or one per segment.

    Returns:
        ``{name: {"miou", "p_at_0.5"}}``.
    """
    from nvila.timetokens import iou

    rng = np.random.default_rng(seed)
    truth = np.asarray(segments, dtype=np.float64)  # (S, 2)
    d = np.broadcast_to(np.asarray(duration, dtype=np.float64), (len(truth),))  # (S,)
    whole = [iou((0.0, float(dk)), tuple(t)) for t, dk in zip(truth, d)]
    ends = np.sort(rng.uniform(0.0, 1.0, size=(draws, 2)), axis=1)[None] * d[:, None, None]  # (S, draws, 2)
    inter = np.clip(np.minimum(ends[..., 1], truth[:, None, 1]) - np.maximum(ends[..., 0], truth[:, None, 0]),
                    0.0, None)  # (S, draws)
    union = np.maximum(ends[..., 1], truth[:, None, 1]) - np.minimum(ends[..., 0], truth[:, None, 0])
    rand = inter / np.where(union > 0, union, 1.0)
    return {"whole_clip": {"miou": float(np.mean(whole)), "p_at_0.5": float(np.mean(np.asarray(whole) >= 0.5))},
            "random": {"miou": float(rand.mean()), "p_at_0.5": float((rand >= 0.5).mean())}}
