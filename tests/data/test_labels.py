"""Dense labels for stage-0 vision pre-training: per-pixel maps from scenes and clips, and their
pooling onto a tile's patch grid."""

import numpy as np
import pytest

from nvila.data import synthetic as S
from nvila.train.stage0 import IGNORE, LABEL_KINDS, patch_labels


def _scene(seed=0, **kw):
    return S.make_scene(np.random.default_rng(seed), (72, 72), code_length=3, clutter=8, **kw)


def test_glyph_centres_carry_the_code_digits_in_reading_order():
    for seed in range(20):
        scene = _scene(seed)
        maps = S.scene_label_maps(scene)
        ys, xs = np.nonzero(maps["glyph"])
        order = np.argsort(xs)
        assert "".join(str(int(d) - 1) for d in maps["glyph"][ys, xs][order]) == scene["code"]["text"]
        assert len(set(ys.tolist())) == 1  # one text row
        assert (np.diff(np.sort(xs)) == S.GLYPH_W + 1).all()  # one glyph pitch apart


def test_colour_and_shape_maps_cover_exactly_the_shape_pixels():
    scene = _scene(3)
    maps = S.scene_label_maps(scene)
    img = S.render_scene(scene)
    for s in scene["shapes"]:
        x, y, w, _ = s["box"]
        inside = maps["colour"][y:y + w, x:x + w] == 1 + list(S.COLOURS).index(s["colour"])
        assert (img[y:y + w, x:x + w][inside] == S.COLOURS[s["colour"]]).all()
        assert (maps["shape"][y:y + w, x:x + w][inside] == 1 + S.SHAPES.index(s["shape"])).all()
    coloured = np.isin(img.reshape(-1, 3).tolist(), [list(c) for c in S.COLOURS.values()]).all(axis=1)
    assert coloured.sum() == (maps["colour"] > 0).sum()


def test_clip_maps_mark_only_the_frames_of_a_flash():
    clip = S.make_clip(np.random.default_rng(1), 2, frames=31, size=24, flash=(2, 2), min_gap=7)
    for e in clip["events"]:
        on = S.clip_label_maps(clip, e["start"])
        x, y, w, h = e["box"]
        assert (on["colour"][y:y + h, x:x + w] == 1 + list(S.COLOURS).index(e["colour"])).all()
        assert on["colour"].astype(bool).sum() == w * h
        assert not S.clip_label_maps(clip, e["start"] + e["duration"])["colour"].any() or len(clip["events"]) > 1


def test_patch_labels_pool_a_known_layout():
    maps = {k: np.zeros((8, 8), dtype=np.int64) for k in LABEL_KINDS}
    maps["glyph"][1, 6] = 1 + 7  # digit 7 in patch (0, 1) of a 2x2 grid of 4-px patches
    maps["colour"][4:8, 0:4] = 3  # patch (1, 0) fully covered
    maps["colour"][4, 4] = 2  # one pixel of patch (1, 1): below the cover threshold
    maps["shape"][4:8, 0:4] = 2
    lab = patch_labels(maps, (0, 0, 8, 8), 2)
    assert lab["glyph"].tolist() == [0, 8, 0, 0]
    assert lab["colour"].tolist() == [0, 0, 3, 0]
    assert lab["shape"].tolist() == [0, 0, 2, 0]
    assert (patch_labels(maps, (0, 0, 8, 8), 2, glyphs=False)["glyph"] == IGNORE).all()
    with pytest.raises(ValueError, match="not a multiple"):
        patch_labels(maps, (0, 0, 7, 8), 2)


def test_small_preset_sizes_and_unknown_preset():
    from nvila.tiny import SYNTH_SCALES, SYNTH_TILE

    assert S.preset_options("fine_code", "small")["canvas"] == (SYNTH_SCALES[-1],) * 2
    # a multi-image prompt gets one tile per image: comparison images are drawn at the tile size,
    # so no resize shrinks their shapes
    assert S.preset_options("compare_count", "small")["canvas"] == (SYNTH_TILE, SYNTH_TILE)
    assert S.preset_options("compare_colour", "small")["canvas"] == (SYNTH_TILE, SYNTH_TILE)
    assert S.preset_options("video_order", "small")["frames"] == 31
    assert S.preset_options("fine_code", "paper") == {}
    with pytest.raises(ValueError, match="valid: paper, small"):
        S.preset_options("fine_code", "huge")


def test_sixteen_of_31_frames_see_every_two_frame_flash_and_four_miss_most():
    from nvila.media import sample_frame_indices

    opts = S.preset_options("video_count", "small")
    many, few = set(sample_frame_indices(31, 16)), set(sample_frame_indices(31, 4))
    seen_many = seen_few = total = 0
    for i in range(200):
        clip = S.make_clip(np.random.default_rng([5, i]), 1 + i % 3, frames=opts["frames"], size=opts["size"],
                           flash=opts["flash"], min_gap=opts["min_gap"])
        for e in clip["events"]:
            frames = set(range(e["start"], e["start"] + e["duration"]))
            seen_many += bool(frames & many)
            seen_few += bool(frames & few)
            total += 1
    assert seen_many == total
    assert seen_few / total < 0.35
