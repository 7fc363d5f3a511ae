"""Tiling geometry against the spec's test vectors, and tile pixels against the golden reference run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nvila.media import load_image, load_video
from nvila.tiling import (
    candidate_grids,
    dynamic_grid,
    dynamic_s2_grid,
    dynamic_s2_tiles,
    dynamic_tiles,
    find_closest_aspect_ratio,
    pad_to_square,
    preprocess_image,
    to_pixels,
)

GOLDEN = Path(__file__).resolve().parents[1] / "assets" / "golden"
SCALES = (448, 896, 1344)
S = 448
MEAN = STD = (0.5, 0.5, 0.5)


def _golden(case: str) -> tuple[dict, dict[str, np.ndarray]]:
    meta = json.loads((GOLDEN / "expected" / f"{case}.json").read_text())
    with np.load(GOLDEN / "expected" / f"{case}.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k.startswith("pixels_")}
    return meta, arrays


def _u8(tiles: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(t).transpose(2, 0, 1) for t in tiles])  # (N, 3, S, S)


# ------------------------------------------------------------------------------------ geometry
def test_candidate_order_matches_reference():
    assert candidate_grids(9, 12) == [
        (3, 3), (9, 1), (1, 9), (10, 1), (1, 10), (2, 5), (5, 2), (11, 1), (1, 11), (1, 12), (6, 2),
        (12, 1), (3, 4), (4, 3), (2, 6),
    ]


def test_candidates_cover_every_grid_in_range():
    grids = candidate_grids(1, 12)
    assert sorted(grids) == sorted((i, j) for i in range(1, 13) for j in range(1, 13) if i * j <= 12)
    assert [i * j for i, j in grids] == sorted(i * j for i, j in grids)


def test_tie_rule_prefers_later_candidate_only_for_large_images():
    grids = [(1, 1), (2, 2)]  # both aspect 1: an exact tie
    assert find_closest_aspect_ratio(1.0, grids, 448, 448, S) == (1, 1)  # 448² <= 0.5·448²·4
    assert find_closest_aspect_ratio(1.0, grids, 1344, 1344, S) == (2, 2)
    assert find_closest_aspect_ratio(2.0, [], 10, 5, S) == (1, 1)


@pytest.mark.parametrize(
    "size, block, tokens",
    [
        ((448, 448), (3, 3), 2305),
        ((1000, 700), (3, 4), 3073),
        ((700, 1000), (4, 3), 3073),
        ((1920, 1080), (3, 4), 3073),
        ((1080, 1920), (5, 2), 2561),
        ((2000, 400), (2, 6), 3073),
        ((400, 2000), (9, 1), 2305),
        ((640, 480), (3, 4), 3073),
        ((5000, 100), (1, 12), 3073),
        ((896, 448), (2, 5), 2561),
        ((100, 100), (3, 3), 2305),
    ],
)
def test_dynamic_s2_block_sizes(size, block, tokens):
    rows, cols = dynamic_s2_grid(*size, SCALES, 12)
    assert (rows, cols) == block
    assert 256 * rows * cols + 1 == tokens


def test_dynamic_s2_rejects_too_few_tiles():
    with pytest.raises(ValueError, match="max_tiles=8"):
        dynamic_s2_grid(1000, 700, SCALES, 8)


@pytest.mark.parametrize(
    "size, n_tiles",
    [((448, 448), 1), ((1000, 700), 7), ((1920, 1080), 9), ((2000, 400), 6), ((640, 480), 13),
     ((1344, 1344), 10), ((896, 448), 3)],
)
def test_dynamic_tile_counts(size, n_tiles):
    rows, cols = dynamic_grid(*size, 1, 12, S)
    assert rows * cols + (rows * cols != 1) == n_tiles
    tiles = dynamic_tiles(Image.new("RGB", size), 1, 12, S)
    assert len(tiles) == n_tiles
    assert all(t.size == (S, S) for t in tiles)


def test_dynamic_s2_tiles_shape_and_row_major_order():
    # A 2000x400 image of horizontal colour bands: with block (2, 6), the last-scale tiles 0-5 are
    # the top band and tiles 6-11 the bottom band.
    arr = np.zeros((400, 2000, 3), np.uint8)
    arr[:200] = (255, 0, 0)
    arr[200:] = (0, 0, 255)
    tiles, block = dynamic_s2_tiles(Image.fromarray(arr), SCALES, 12)
    assert block == (2, 6)
    assert len(tiles) == 1 + 4 + 12
    last = tiles[5:]
    assert all(t.getpixel((S // 2, S // 4))[0] > 200 for t in last[:6])
    assert all(t.getpixel((S // 2, 3 * S // 4))[2] > 200 for t in last[6:])


def test_pad_to_square_centres_the_image():
    image = Image.new("RGB", (40, 10), (255, 0, 0))
    out = pad_to_square(image)
    assert out.size == (40, 40)
    assert out.getpixel((20, 14)) == (127, 127, 127)
    assert out.getpixel((20, 15)) == (255, 0, 0)
    assert out.getpixel((20, 24)) == (255, 0, 0)
    assert out.getpixel((20, 25)) == (127, 127, 127)
    assert pad_to_square(Image.new("RGB", (7, 7))).size == (7, 7)


def test_to_pixels_arithmetic():
    tile = np.array([[[0, 128, 255]]], np.uint8).repeat(4, 0).repeat(4, 1)  # (4, 4, 3)
    x = to_pixels([Image.fromarray(tile)], 4, MEAN, STD)
    assert x.shape == (1, 3, 4, 4) and x.dtype == torch.float32
    expected = ((np.float64([0, 128, 255]) * 0.00392156862745098).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    assert torch.equal(x[0, :, 0, 0], torch.from_numpy(expected))
    assert to_pixels([Image.new("RGB", (10, 6))], 4, MEAN, STD).shape == (1, 3, 4, 4)


# ------------------------------------------------------------------------------------ dispatch
def test_preprocess_modes():
    image = Image.new("RGB", (1000, 700), (10, 20, 30))
    tiles, block = preprocess_image(image, "dynamic_s2", tile=S, scales=SCALES, max_tiles=12, single=True)
    assert (len(tiles), block) == (17, (3, 4))
    tiles, block = preprocess_image(image, "dynamic_s2", tile=S, scales=SCALES, max_tiles=12, single=False)
    assert (len(tiles), block, tiles[0].size) == (1, None, (S, S))
    tiles, block = preprocess_image(image, "dynamic", tile=S, min_tiles=1, max_tiles=12, single=True)
    assert (len(tiles), block) == (7, None)
    assert len(preprocess_image(image, "dynamic", tile=S, single=False)[0]) == 1
    for mode in ("resize", "pad", "plain"):
        tiles, block = preprocess_image(image, mode, tile=S, single=True)
        assert (len(tiles), block, tiles[0].size) == (1, None, (S, S))
    padded = preprocess_image(image, "pad", tile=S, single=True)[0][0]
    assert padded.getpixel((S // 2, 2)) == (127, 127, 127)


def test_preprocess_unknown_mode_lists_valid_ones():
    with pytest.raises(ValueError, match="dynamic_s2, dynamic, resize, pad, plain"):
        preprocess_image(Image.new("RGB", (8, 8)), "anyres", tile=S, single=True)


# ------------------------------------------------------------------------------------ golden pixels
def test_golden_dynamic_s2_pixels():
    meta, arrays = _golden("nvila__image")
    image = load_image(GOLDEN / "inputs" / "image_1000x700.png")
    tiles, block = preprocess_image(image, "dynamic_s2", tile=S, scales=SCALES, max_tiles=12, single=True)
    assert list(block) == meta["media"][0]["block_size"]
    np.testing.assert_array_equal(_u8(tiles), arrays["pixels_0"])
    pixel_sum = to_pixels(tiles, S, MEAN, STD).double().sum().item()
    assert pixel_sum == pytest.approx(meta["media"][0]["pixel_sum"], abs=1e-3)


def test_golden_dynamic_lite_pixels():
    meta, arrays = _golden("nvila-lite__image")
    image = load_image(GOLDEN / "inputs" / "image_1000x700.png")
    tiles, block = preprocess_image(image, "dynamic", tile=S, min_tiles=1, max_tiles=12, single=True)
    assert block is None and len(tiles) == len(meta["media"]) == 7
    for i, (t, medium) in enumerate(zip(tiles, meta["media"])):
        assert medium["tile"] == i
        np.testing.assert_array_equal(_u8([t]), arrays[f"pixels_{i}"])
        assert to_pixels([t], S, MEAN, STD).double().sum().item() == pytest.approx(medium["pixel_sum"], abs=1e-3)


def test_golden_video_frames_pixels():
    meta, arrays = _golden("nvila-video__video")
    medium = meta["media"][0]
    video = load_video(GOLDEN / "inputs" / "video_37f", num_frames=16)
    assert video.num_source_frames == medium["num_source_frames"] == 37
    assert [f"frame_{i:04d}.png" for i in video.indices] == medium["frames_used"]
    tiles = [t for f in video.frames for t in preprocess_image(f, "resize", tile=S, single=False)[0]]
    np.testing.assert_array_equal(_u8(tiles), arrays["pixels_0"])
    assert to_pixels(tiles, S, MEAN, STD).double().sum().item() == pytest.approx(medium["pixel_sum"], abs=1e-3)
