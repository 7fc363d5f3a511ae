"""Video encoders (spec §9.3): layout and pooled features agree, pooling is a plain group mean."""

import pytest
import torch

from nvila.config import VideoEncoderConfig
from nvila.temporal import encode_video_features, video_layout

TSP_VIDEO = VideoEncoderConfig(kind="tsp", pool_sizes=[(8, 1, 1)])


def _naive_tsp(feats: torch.Tensor, pt: int, ph: int, pw: int) -> torch.Tensor:
    t, n, d = feats.shape
    s = int(n ** 0.5)
    grid = feats.view(t, s, s, d)
    out = []
    for f in range(t // pt):
        for r in range(s // ph):
            for c in range(s // pw):
                group = grid[f * pt:(f + 1) * pt, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw]
                out.append(group.reshape(-1, d).double().mean(0))
    return torch.stack(out).float()


def test_basic_keeps_every_frame():
    cfg = VideoEncoderConfig()
    feats = torch.randn(8, 16, 4)
    assert video_layout(8, 16, cfg) == [(8, 16)]
    assert torch.equal(encode_video_features(feats, cfg), feats.reshape(128, 4))


def test_basic_allows_non_square_frames():
    assert video_layout(3, 10, VideoEncoderConfig()) == [(3, 10)]


def test_tsp_8_1_1_averages_consecutive_frames():
    feats = torch.randn(16, 16, 4)
    assert video_layout(16, 16, TSP_VIDEO) == [(2, 16)]
    out = encode_video_features(feats, TSP_VIDEO)
    assert out.shape == (32, 4)
    torch.testing.assert_close(out[:16], feats[:8].mean(0))
    torch.testing.assert_close(out[16:], feats[8:].mean(0))


def test_tsp_2_2_2_matches_loop():
    torch.manual_seed(0)
    cfg = VideoEncoderConfig(kind="tsp", pool_sizes=[(2, 2, 2)])
    feats = torch.randn(6, 36, 5)
    assert video_layout(6, 36, cfg) == [(3, 9)]
    torch.testing.assert_close(encode_video_features(feats, cfg), _naive_tsp(feats, 2, 2, 2))


def test_tsp_concatenates_granularities_in_order():
    torch.manual_seed(0)
    pools = [(4, 1, 1), (1, 2, 2), (2, 4, 1)]
    cfg = VideoEncoderConfig(kind="tsp", pool_sizes=pools)
    feats = torch.randn(8, 16, 3)
    layout = video_layout(8, 16, cfg)
    assert layout == [(2, 16), (8, 4), (4, 4)]
    out = encode_video_features(feats, cfg)
    assert out.shape == (sum(t * n for t, n in layout), 3)
    torch.testing.assert_close(out, torch.cat([_naive_tsp(feats, *p) for p in pools]))


def test_tsp_rejects_indivisible_frames():
    with pytest.raises(ValueError, match="12 frames are not divisible by the temporal pool 8"):
        video_layout(12, 16, TSP_VIDEO)
    with pytest.raises(ValueError, match="temporal pool 8"):
        encode_video_features(torch.randn(12, 16, 4), TSP_VIDEO)


def test_tsp_rejects_indivisible_grid():
    cfg = VideoEncoderConfig(kind="tsp", pool_sizes=[(1, 3, 1)])
    with pytest.raises(ValueError, match="4x4 token grid is not divisible by the spatial pool 3x1"):
        video_layout(4, 16, cfg)
    with pytest.raises(ValueError, match="square"):
        video_layout(4, 15, TSP_VIDEO)


def test_unknown_kind():
    with pytest.raises(ValueError, match="valid: basic, tsp"):
        video_layout(4, 16, VideoEncoderConfig(kind="slowfast"))
