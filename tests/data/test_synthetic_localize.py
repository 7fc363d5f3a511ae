"""The temporal-localization family ``video_localize``: frames, answers, resolvability, baselines."""

from __future__ import annotations

import json
from itertools import product

import numpy as np
import pytest

from nvila.data import synthetic as S
from nvila.data.synthetic_localize import interval_baselines, localize_clip
from nvila.media import load_video


def test_the_square_is_on_screen_exactly_during_the_answered_interval(tmp_path):
    path = S.generate("video_localize", 6, tmp_path, 3)
    for r in (json.loads(line) for line in path.read_text().splitlines()):
        video = load_video(str(tmp_path / r["video"]), num_frames=16)
        start, end = r["segment"]
        assert r["conversations"][1]["value"] == f"<{start:g}> <{end:g}>" and r["duration"] == 8.0
        x, y, w, h = r["meta"]["scene"]["events"][0]["box"]
        colour = np.array(S.COLOURS[r["meta"]["scene"]["events"][0]["colour"]])
        for f, frame in enumerate(video.frames):  # frame f covers [f / fps, (f + 1) / fps)
            patch = np.asarray(frame)[y:y + h, x:x + w].reshape(-1, 3)
            shown = bool((patch == colour).all())
            assert shown == (start <= f / r["fps"] < end), (r["id"], f)


def test_every_interval_has_a_distinct_coverage_of_the_models_four_pooled_bins():
    # 16 frames pooled 4x: the model sees the fraction of each bin the square covers, not where in it
    frames, slot, bins = 16, 2, 4
    seen = {}
    for length, first in product(range(2, 5), range(frames // slot)):
        if first + length > frames // slot:
            continue
        on = np.zeros(frames)
        on[first * slot:(first + length) * slot] = 1
        coverage = tuple(on.reshape(bins, -1).mean(1))
        assert coverage not in seen, (seen.get(coverage), (first, length))
        seen[coverage] = (first, length)
    assert len(seen) == 18


def test_bad_geometry_is_an_error():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="whole number of slots"):
        localize_clip(rng, frames=15, size=24, slot=2, lengths=(2, 4))
    with pytest.raises(ValueError, match="must lie in"):
        localize_clip(rng, frames=16, size=24, slot=2, lengths=(2, 8))


def test_baselines_whole_clip_exact_and_random_interval_by_monte_carlo():
    b = interval_baselines([(0.0, 4.0), (2.0, 4.0)], 8.0, draws=200_000)
    assert b["whole_clip"] == {"miou": pytest.approx((0.5 + 0.25) / 2), "p_at_0.5": 0.5}
    # two sorted uniform ends on [0, 1] against the truth [0, 1/2]: E[IoU] by numerical integration
    u = (np.arange(2000) + 0.5) / 2000
    a, c = np.minimum.outer(u, u), np.maximum.outer(u, u)
    inter = np.clip(np.minimum(c, 0.5) - a, 0, None)
    exact = (inter / np.maximum(c, 0.5)).mean()
    half = interval_baselines([(0.0, 4.0)], 8.0, draws=200_000)["random"]["miou"]
    assert half == pytest.approx(exact, abs=5e-3)
